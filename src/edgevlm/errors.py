"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class UserError(Exception):
    """Bad input: the message names the file, field or value and says what would fix it."""


SEED_LIMIT = 2**32  # numpy's seeds are 32-bit; torch and random take these too


def check_seed(seed, flag: str = "--seed") -> None:
    """A seed every library edgevlm seeds accepts: an integer in [0, 2^32)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise UserError(f"{flag} {seed!r} is not a valid seed; give an integer from 0 to "
                        f"{SEED_LIMIT - 1}")


def check_at_least(low: int, **flags) -> None:
    """Each named integer option (None: not given) is at least `low`; names are the options'
    Python names (max_new_tokens -> --max-new-tokens)."""
    for name, value in flags.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < low):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {value!r} must be an integer of at least {low}")
