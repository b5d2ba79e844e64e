"""One hierarchy of errors. Each class carries its exit code (see the README and ../shared cli.md);
only the CLI turns them into `imgkit: error: ...` lines."""


class ImgkitError(Exception):
    """Base class. `hint` is an optional second line telling the user what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class OperationFailed(ImgkitError):
    """The operation ran and found a problem (verify found damage, a boot check failed)."""

    exit_code = 1


class InputError(ImgkitError):
    """The caller's input is unusable: missing file, refused target, bad option value."""

    exit_code = 3


class BadImage(InputError):
    """The image is not an imgk image, is damaged, truncated or hostile."""


class CorruptChunk(BadImage):
    """One chunk failed its integrity check; `offset` is its logical offset."""

    def __init__(self, message: str, offset: int, hint: str | None = None):
        super().__init__(message, hint)
        self.offset = offset


class NewerFormat(BadImage):
    """The image uses a format version or required feature this imgkit does not know."""


class WrongPassword(InputError):
    """The password does not open the image."""


class RefusedTarget(InputError):
    """A restore/capture target is unsafe: mounted, in use, too small, or the source itself."""


class EnvironmentProblem(ImgkitError):
    """The machine lacks something (a program, /dev/fuse, the libguestfs appliance)."""

    exit_code = 4


class InternalError(ImgkitError):
    """imgkit broke one of its own rules: a bug, not the user's input or the machine. The CLI turns
    any exception that is not an ImgkitError into one of these (one line, exit 70 = EX_SOFTWARE);
    --debug shows the traceback."""

    exit_code = 70

    @classmethod
    def from_exception(cls, e: BaseException) -> "InternalError":
        return cls(f"internal error: {type(e).__name__}: {e}",
                   hint="this is a bug in imgkit: please report it with the output of --debug")


class Interrupted(ImgkitError):
    """The user pressed Ctrl-C; nothing half-written was left behind."""

    exit_code = 130
