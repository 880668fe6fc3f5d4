"""What a user may type, checked in one place: every command-line option's ``type=`` and every
``CONVOY_*`` variable's value.

Each check takes the text as typed and returns the value, or raises :class:`BadValue` saying
what it takes. argparse prints that as a one-line usage error naming the option;
``Settings.from_env`` as a :class:`UsageError` naming the variable. Numbers are finite (NaN and
infinities are refused everywhere) and within what the code that uses them accepts, so a
mistake stops the command before anything starts or is written.
"""

from __future__ import annotations

import ipaddress
import math
import re
from urllib.parse import urlsplit

from convoy.shared.errors import BadValue

#: Seeds are 32-bit where they end up (NumPy's legacy seeding, Keras's set_random_seed).
SEED_MAX = 2**32 - 1
PORT_MAX = 65535
#: The longest duration a variable may give (a year): Redis, Celery and the kernel's timers
#: all take it, where 1e300 seconds would overflow one of them.
DURATION_MAX_S = 365 * 86400
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Broker URL schemes: redis-py's, and Celery's own for Redis on a Unix socket.
BROKER_SCHEMES = ("redis", "rediss", "unix", "redis+socket")
_SOCKET_SCHEMES = ("unix", "redis+socket")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def whole(text: str, least: int | None = None, most: int | None = None) -> int:
    """A whole number in ``[least, most]`` (either end open when None)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or (least is not None and value < least) or (most is not None and value > most):
        raise BadValue(f"expected a whole number{_bounds(least, most)}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """1, 2, ...: sizes and counts of things that cannot be none."""
    try:
        return whole(text, least=1)
    except BadValue:
        raise BadValue(f"expected a positive whole number (1 or more), got {text!r}") from None


def count(text: str) -> int:
    """0, 1, 2, ...: counts where none is meaningful, and indexes."""
    return whole(text, least=0)


def seed(text: str) -> int:
    """A random seed: a whole number from 0 to 2**32 - 1."""
    try:
        return whole(text, least=0, most=SEED_MAX)
    except BadValue:
        raise BadValue(f"expected a seed, a whole number from 0 to {SEED_MAX}, got {text!r}") from None


#: Priority tiers a job may take (higher first), and the most a weight may be.
PRIORITY_MIN, PRIORITY_MAX, WEIGHT_MAX = -9, 9, 1000


def priority(text: str) -> int:
    """A job's priority tier: a whole number from -9 to 9, higher first (0: the default)."""
    return _bounded(text, "a priority (higher goes first)", PRIORITY_MIN, PRIORITY_MAX)


def weight(text: str) -> int:
    """A job's share within its tier: steps per turn, a whole number from 1 to 1000."""
    return _bounded(text, "a weight (steps per turn)", 1, WEIGHT_MAX)


def max_running(text: str) -> int:
    """The most steps of a job out at once: a whole number, 0 for no cap."""
    try:
        return whole(text, least=0)
    except BadValue:
        raise BadValue(f"expected the most steps at once, a whole number (0: no cap), got {text!r}") from None


#: Upper bounds of sizes and counts: past these a value is a typo, and would break something on
#: the way (a process per worker, an epoch loop that never ends, a batch that cannot fit in memory).
WORKERS_MAX = 256  # processes on one machine: local workers, or a worker's pool (each loads a model)
EPOCHS_MAX = 10_000
SHARD_MAX = 100_000  # images per shard: one worker's step, within the task time limit
IMAGE_BATCH_MAX = 4096  # images per forward pass (4096 x 150 x 150 x 3 float32: 1 GiB)
TRAIN_BATCH_MAX = 65_536  # rows of features per training step
DENSE_UNITS_MAX = 65_536
DELIVERIES_MAX = 100
#: RMSprop rates: above 0, at most 1 (past that a classifier only diverges).
LEARNING_RATE_MAX = 1.0


def _bounded(text: str, what: str, least: int, most: int) -> int:
    try:
        return whole(text, least=least, most=most)
    except BadValue:
        raise BadValue(f"expected {what}, a whole number from {least} to {most}, got {text!r}") from None


def workers(text: str) -> int:
    """Processes on one machine: ``convoy run --workers``, ``convoy worker --concurrency``."""
    return _bounded(text, "a number of processes", 1, WORKERS_MAX)


def epochs(text: str) -> int:
    """Epochs of training or fine-tuning."""
    return _bounded(text, "a number of epochs", 1, EPOCHS_MAX)


def shard_size(text: str) -> int:
    """Images per shard."""
    return _bounded(text, "a number of images per shard", 1, SHARD_MAX)


#: ``--format`` values: where features are written (HDF5 shard files are always written: they
#: are what resumes, merges and training read).
OUTPUT_FORMATS = ("hdf5", "parquet", "npy")


def formats(text: str) -> tuple[str, ...]:
    """One or several output formats, comma-separated (``hdf5,parquet``), each once, in the
    order of :data:`OUTPUT_FORMATS`."""
    names = [n.strip().lower() for n in text.split(",")]
    unknown = [n for n in names if n not in OUTPUT_FORMATS]
    if not text.strip() or unknown:
        raise BadValue(f"expected one or more of {', '.join(OUTPUT_FORMATS)} separated by commas, got {text!r}")
    return tuple(f for f in OUTPUT_FORMATS if f in names)


def class_names(text: str) -> tuple[str, ...]:
    """Class names in index order, comma-separated (``cat,dog``): each once, none empty."""
    names = tuple(n.strip() for n in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise BadValue(f"expected class names separated by commas, each once and none empty, got {text!r}")
    return names


def column(text: str) -> str:
    """A column or JSON field name: not empty."""
    if not text.strip():
        raise BadValue(f"expected a name, got {text!r}")
    return text.strip()


def image_batch(text: str) -> int:
    """Images per forward pass (extraction, Grad-CAM)."""
    return _bounded(text, "a batch size", 1, IMAGE_BATCH_MAX)


def train_batch(text: str) -> int:
    """Rows of features per training step."""
    return _bounded(text, "a batch size", 1, TRAIN_BATCH_MAX)


def dense_units(text: str) -> int:
    """Units of the classifier's Dense layer."""
    return _bounded(text, "a number of units", 1, DENSE_UNITS_MAX)


def deliveries(text: str) -> int:
    """Deliveries of a step before it is given up."""
    return _bounded(text, "a number of deliveries", 1, DELIVERIES_MAX)


def port(text: str) -> int:
    """A TCP port to listen on, 1 to 65535."""
    try:
        return whole(text, least=1, most=PORT_MAX)
    except BadValue:
        raise BadValue(f"expected a port from 1 to {PORT_MAX}, got {text!r}") from None


def real(text: str, least: float | None = None, most: float | None = None, above: float | None = None,
         below: float | None = None) -> float:
    """A finite number within the bounds given (least/most inclusive, above/below exclusive)."""
    try:
        value = float(text)
    except ValueError:
        raise BadValue(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise BadValue(f"expected a finite number, got {text!r}")
    bounds = (("at least", least, value >= (least or 0)), ("at most", most, value <= (most or 0)),
              ("above", above, value > (above or 0)), ("below", below, value < (below or 0)))
    broken = [(words, bound) for words, bound, ok in bounds if bound is not None and not ok]
    if broken:
        wanted = " and ".join(f"{words} {bound:g}" for words, bound, _ in bounds if bound is not None)
        raise BadValue(f"expected a number {wanted}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0: rates, timeouts."""
    return real(text, above=0)


def learning_rate(text: str) -> float:
    """An optimizer's learning rate: a finite number above 0 and at most 1."""
    try:
        return real(text, above=0, most=LEARNING_RATE_MAX)
    except BadValue:
        raise BadValue(f"expected a learning rate, a finite number above 0 and at most {LEARNING_RATE_MAX:g}, "
                       f"got {text!r}") from None


def fraction(text: str) -> float:
    """A finite number from 0 up to, not including, 1: a dropout rate."""
    return real(text, least=0, below=1)


def duration(text: str) -> int:
    """``3600``, ``90m``, ``6h``, ``7d``: whole seconds from 1 up to a year."""
    body = text.strip().lower()
    unit = _UNITS_S.get(body[-1:], 0)
    try:
        seconds = float(body[:-1] if unit else body) * (unit or 1)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 1 <= seconds <= DURATION_MAX_S):
        raise BadValue(f"expected a duration from 1 s to 365d (seconds, or like 90m, 6h, 7d), got {text!r}")
    return int(seconds)


def size(text: str) -> int:
    """Bytes from ``512M``, ``2G``, ``1.5GiB`` or a plain number of bytes (0: the default)."""
    match = _SIZE.match(text)
    number = float(match.group(1)) if match else math.nan
    if not math.isfinite(number):
        raise BadValue(f"expected a size such as 512M or 8G (0: the default), got {text!r}")
    return int(number * 1024 ** "bkmgt".index((match.group(2) or "b").lower()))


def address(text: str) -> str:
    """An address to listen on: an IPv4 or IPv6 address, or a host name."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.removesuffix(".").split(".")
    numeric = all(label.isdigit() for label in labels)  # 256.1.1.1 is a bad address, not a name
    if numeric or len(text) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise BadValue(f"expected an IP address or host name (127.0.0.1; 0.0.0.0 for every interface; "
                       f"::1; localhost), got {text!r}")
    return text


def broker_url(text: str) -> str:
    """A Redis URL: ``redis://[:PASSWORD@]HOST[:PORT][/DB]``, ``rediss://...`` or a socket's
    ``unix:///path``. The message never repeats the URL, which may hold a password."""
    problem = _broker_problem(text)
    if problem:
        raise BadValue(f"expected a Redis URL, redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://... (TLS) or "
                       f"unix:///path/to/socket; {problem}")
    return text


def _broker_problem(text: str) -> str:
    try:
        parts = urlsplit(text)
        number = parts.port
    except ValueError:
        return "its port is not a number from 1 to 65535"
    if not parts.scheme or "://" not in text:
        return "this one has no scheme (redis://)"
    if parts.scheme not in BROKER_SCHEMES:
        return f"{parts.scheme}:// is not one of {', '.join(s + '://' for s in BROKER_SCHEMES)}"
    if parts.scheme in _SOCKET_SCHEMES:
        return "" if parts.path not in ("", "/") else "it names no socket path"
    if not parts.hostname:
        return "it names no host"
    if number == 0:
        return "its port is not a number from 1 to 65535"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return "its database (the path after the host) is not a whole number"
    return ""


def _bounds(least: int | None, most: int | None) -> str:
    if least is not None and most is not None:
        return f" from {least} to {most}"
    if least is not None:
        return f" of {least} or more"
    return f" of {most} or less" if most is not None else ""
