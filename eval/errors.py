"""The one exception type for bad input to `stepcache compare`."""
from ..errors import InputError



class CompareError(InputError):
    """Bad input (missing or unreadable files, mismatched videos, bad weight files).

    The CLI prints the message as `error: ...` and exits with code 2, without a traceback; the message alone must
    therefore say which file is wrong and how.
    """
