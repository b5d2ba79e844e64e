"""The pyfuse3 adapter over imgkit.views.vfs (imported as imgkit_fuse so it cannot collide with other
projects' `fuse` module). imgkit.operations.mount drives it; nothing else imports pyfuse3."""
from .serve import mount_options, serve  # noqa: F401
