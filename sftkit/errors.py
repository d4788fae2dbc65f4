"""The one exception for bad user input."""


class UserError(Exception):
    """Bad input from the user. The message must say what is wrong and what to do instead."""


class Stopped(Exception):
    """Training stopped early by Ctrl-C or SIGTERM, after saving a resumable checkpoint. Not a success: the command
    line exits with `code` (130 for SIGINT, 143 for SIGTERM, as a shell reports a process killed by them), so
    `train && infer` and job schedulers do not treat a half-trained run as done."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
