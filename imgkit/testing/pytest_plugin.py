"""pytest plugin: fixtures that build small bootable VM images (see vm-fixtures/). Filled in by the
boot-check work; registered through the pytest11 entry point so other projects get it on install."""
