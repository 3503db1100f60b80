"""Argument checks shared by layers and models, with messages a user can act on."""

import numbers


def check_int(name, value, minimum=None, maximum=None, owner=None):
    """Returns `value` if it is an int within [minimum, maximum], else raises."""
    where = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where}`{name}` must be an integer, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}`{name}` must be >= {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{where}`{name}` must be <= {maximum}, got {value}.")
    return int(value)


def check_float(name, value, minimum=None, maximum=None, exclusive_minimum=None, owner=None):
    """Returns `value` as a float if it lies in range, else raises."""
    where = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}`{name}` must be a number, got {value!r}.")
    if exclusive_minimum is not None and not value > exclusive_minimum:
        raise ValueError(f"{where}`{name}` must be > {exclusive_minimum}, got {value}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}`{name}` must be >= {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{where}`{name}` must be <= {maximum}, got {value}.")
    return float(value)


def check_choice(name, value, choices, owner=None):
    """Returns `value` if it is one of `choices`, else raises listing them."""
    if value not in choices:
        where = f"{owner}: " if owner else ""
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{where}`{name}` must be one of {listed}; got {value!r}.")
    return value


def as_pair(name, value, owner=None):
    """Accepts an int or a pair of ints (e.g. a patch size) and returns a tuple."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2:
        where = f"{owner}: " if owner else ""
        raise ValueError(f"{where}`{name}` must be an int or a pair of ints, got {value!r}.")
    return tuple(check_int(name, v, minimum=1, owner=owner) for v in value)
