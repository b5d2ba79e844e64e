"""pytest plugin (registered as the `imgkit_vm_fixtures` pytest11 entry point, so any project that
installs imgkit gets it): fixtures that build imgkit's small VM images, and a boot checker.

    def test_my_image_boots(imgkit_boot_check, tmp_path):
        result = imgkit_boot_check("build/disk.qcow2", expect=r"login:", timeout=120)
        assert result.passed, result.summary()

    def test_restore_keeps_it_bootable(linux_bios_image, imgkit_boot_check): ...

The image fixtures are session-scoped and cached on disk by the hash of their inputs (see
imgkit.testing.fixtures), so a second session pays nothing.
"""
from __future__ import annotations

import pytest

from . import fixtures as _fx


@pytest.fixture(scope="session")
def vm_fixture():
    """A factory: vm_fixture("linux-uefi") -> path of the built image (built once, cached)."""
    return _fx.build_fixture


@pytest.fixture(scope="session")
def vm_fixture_info():
    """A factory: vm_fixture_info("iso") -> FixtureInfo (expect string, firmware, media...)."""
    return _fx.fixture_info


@pytest.fixture(scope="session")
def tiny_bios_image() -> str:
    return _fx.build_fixture("tiny-bios")


@pytest.fixture(scope="session")
def linux_bios_image() -> str:
    return _fx.build_fixture("linux-bios")


@pytest.fixture(scope="session")
def linux_uefi_image() -> str:
    return _fx.build_fixture("linux-uefi")


@pytest.fixture(scope="session")
def iso_image() -> str:
    return _fx.build_fixture("iso")


@pytest.fixture(scope="session")
def multifs_image() -> str:
    return _fx.build_fixture("multifs")


@pytest.fixture(scope="session")
def multifs_manifest() -> dict:
    """multifs.json: partitions and files (path, type, size, sha256, mode, symlink target)."""
    return _fx.fixture_sidecar("multifs")


@pytest.fixture(scope="session")
def imgkit_boot_check():
    """A function boot_check(image, **options) -> BootResult (see imgkit.operations.bootcheck.boot_check)."""
    from ..operations.bootcheck import boot_check
    return boot_check
