"""Platform facts and mechanisms: block devices, restore-target safety, qemu processes, accelerators, sandboxes, durable writes."""
