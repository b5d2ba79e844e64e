"""Build the VM fixtures of vm-fixtures/ on demand and cache them by the hash of their inputs.

    from imgkit.testing.fixtures import build_fixture, fixture_info
    disk = build_fixture("linux-bios")          # a path in the cache; built once per input hash
    fixture_info("linux-bios").expect            # what it prints on the serial console

The recipes are scripts (vm-fixtures/recipes/*.py, no committed images). The cache key is the
SHA-256 of: the recipe and its shared helpers, the fixture's manifest entry, the bytes of every input
file the recipe names (kernel, busybox, GRUB modules...) and the Debian versions of the tools that
build it. So a kernel update or an edited recipe rebuilds, and nothing else does.

Environment: IMGKIT_FIXTURE_CACHE (cache directory, default vm-fixtures/cache/),
IMGKIT_VM_FIXTURES_DIR (where vm-fixtures/ is, default: next to the imgkit package in a checkout).
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache

# Tools whose versions change what a recipe produces; their versions are part of every cache key.
_TOOL_PACKAGES = ("e2fsprogs", "dosfstools", "mtools", "ntfs-3g", "fdisk", "xorriso", "grub-pc-bin",
                  "grub-efi-amd64-bin", "isolinux", "syslinux-common", "busybox-static")


class FixtureError(RuntimeError):
    pass


def fixtures_dir() -> str:
    env = os.environ.get("IMGKIT_VM_FIXTURES_DIR")
    if env:
        return os.path.abspath(env)
    here = os.path.dirname(os.path.abspath(__file__))
    candidate = os.path.normpath(os.path.join(here, "..", "..", "vm-fixtures"))
    if not os.path.isfile(os.path.join(candidate, "manifest.json")):
        raise FixtureError("vm-fixtures/ not found: set IMGKIT_VM_FIXTURES_DIR to a checkout's vm-fixtures")
    return candidate


def cache_dir() -> str:
    return os.path.abspath(os.environ.get("IMGKIT_FIXTURE_CACHE") or os.path.join(fixtures_dir(), "cache"))


def manifest() -> dict:
    with open(os.path.join(fixtures_dir(), "manifest.json")) as f:
        return json.load(f)


@dataclass(frozen=True)
class FixtureInfo:
    name: str
    output: str           # file name of the built image
    format: str           # container format of the output ("raw")
    boots: bool
    firmware: str | None  # "bios" / "uefi"
    media: str | None     # "disk" / "cdrom"
    expect: str | None    # what the serial console prints when it booted (a regex-safe string)
    memory: str | None
    entry: dict           # the whole manifest entry


def fixture_names(bootable_only: bool = False) -> list[str]:
    return [n for n, e in manifest()["fixtures"].items() if e.get("boots") or not bootable_only]


def fixture_info(name: str) -> FixtureInfo:
    entries = manifest()["fixtures"]
    if name not in entries:
        raise FixtureError(f"no fixture {name!r} (known: {', '.join(entries)})")
    e = entries[name]
    return FixtureInfo(name, e["output"], e.get("format", "raw"), bool(e.get("boots")), e.get("firmware"),
                       e.get("media"), e.get("expect"), e.get("memory"), e)


def _load_recipe(name: str):
    path = os.path.join(fixtures_dir(), fixture_info(name).entry["recipe"])
    recipes = os.path.dirname(path)
    if recipes not in sys.path:
        sys.path.insert(0, recipes)  # recipes import their shared _common helpers
    spec = importlib.util.spec_from_file_location(f"imgkit_vm_recipe_{name.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


@lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=1)
def _tool_versions() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *_TOOL_PACKAGES],
                             capture_output=True, text=True).stdout
    except OSError:
        out = ""
    return out


def input_hash(name: str) -> str:
    """The cache key of a fixture (hex)."""
    module, path = _load_recipe(name)
    h = hashlib.sha256()
    recipes = os.path.dirname(path)
    for src in (path, os.path.join(recipes, "_common.py")):
        with open(src, "rb") as f:
            h.update(f.read())
    h.update(json.dumps(fixture_info(name).entry, sort_keys=True).encode())
    for inp in module.inputs():
        st = os.stat(inp)
        h.update(f"{inp}\0{_file_digest(inp, st.st_size, st.st_mtime_ns)}\0".encode())
    h.update(_tool_versions().encode())
    return h.hexdigest()


def fixture_dir(name: str, key: str | None = None) -> str:
    """Where the build for `name`'s current inputs lives (`key`: input_hash(name), if known)."""
    return os.path.join(cache_dir(), f"{name}-{(key or input_hash(name))[:16]}")


def build_fixture(name: str, rebuild: bool = False) -> str:
    """The path of the fixture's image, built first if the cache has no build for its inputs.
    Safe to call from several processes at once (a lock per fixture)."""
    info = fixture_info(name)
    key = input_hash(name)  # hashes every input: once per call
    final = fixture_dir(name, key)
    image = os.path.join(final, info.output)
    if os.path.isfile(image) and not rebuild:
        return image
    os.makedirs(cache_dir(), exist_ok=True)
    with open(os.path.join(cache_dir(), f".{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(image) and not rebuild:
            return image  # another process built it while we waited
        module, _ = _load_recipe(name)
        work = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir())
        os.chmod(work, 0o755)
        try:
            built = module.build(work)
            if os.path.basename(built) != info.output:
                raise FixtureError(f"recipe {name} made {built}, the manifest says {info.output}")
            with open(os.path.join(work, "input-hash"), "w") as f:
                f.write(key + "\n")
            if os.path.exists(final):
                shutil.rmtree(final)
            # The directory appears complete or not at all; a directory, renamed under the fixture's
            # lock after the old one is gone: not writeback.publish (files only: its fallback is link()).
            os.replace(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        _prune_old_builds(name, keep=final)
    return image


def _prune_old_builds(name: str, keep: str) -> None:
    for entry in os.listdir(cache_dir()):
        full = os.path.join(cache_dir(), entry)
        if entry.startswith(f"{name}-") and full != keep and len(entry) == len(name) + 17 \
                and os.path.isdir(full):
            shutil.rmtree(full, ignore_errors=True)


def fixture_sidecar(name: str) -> dict | None:
    """The JSON a fixture writes next to its image (multifs: every partition and file with its
    sha256), or None."""
    side = fixture_info(name).entry.get("sidecar")
    if not side:
        return None
    image = build_fixture(name)
    with open(os.path.join(os.path.dirname(image), side)) as f:
        return json.load(f)


def main(argv=None) -> int:
    """python -m imgkit.testing.fixtures [NAME...]: build (or find) fixtures and print their paths."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m imgkit.testing.fixtures")
    parser.add_argument("names", nargs="*", help="fixtures to build (default: all)")
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args(argv)
    for name in args.names or fixture_names():
        print(f"{name}\t{build_fixture(name, rebuild=args.rebuild)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
