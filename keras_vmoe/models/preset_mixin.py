"""`from_preset` for built-in names: the mixin every model class of the zoo uses.

keras-hub's `from_preset` reads a preset folder or a hub handle. The mixin
first asks the resolver that `keras_vmoe.presets` installs (at import, as
`keras_vmoe` imports it) to turn a built-in name into a folder (downloading
and converting a released checkpoint on first use), and names the file when a
local preset's weights are truncated or corrupt. The resolver is installed
from outside so that imports point one way: `keras_vmoe.presets` imports the
model families, never the reverse.
"""

import os
import pathlib

import h5py

from keras_vmoe.errors import PresetError

_resolver = None


def set_preset_resolver(resolver):
    """Installs `resolver(name_or_path) -> path or handle` (keras_vmoe.presets does)."""
    global _resolver
    _resolver = resolver


def unreadable_weight_files(folder):
    """The `*.weights.h5` files of a preset folder that h5py cannot open, with why."""

    unreadable = []
    for path in sorted(pathlib.Path(folder).glob("*.weights.h5")):
        try:
            h5py.File(path, "r").close()
        except OSError as error:
            unreadable.append(f"{path} ({error})")
    return unreadable


class BuiltinPresetMixin:
    """Lets `from_preset` take the built-in names of `keras_vmoe.presets`, and
    names the file when a local preset's weights are truncated or corrupt."""

    @classmethod
    def from_preset(cls, preset, *args, **kwargs):
        path = _resolver(preset) if _resolver is not None else preset
        try:
            return super().from_preset(path, *args, **kwargs)
        except OSError as error:
            unreadable = unreadable_weight_files(path) if os.path.isdir(str(path)) else []
            if not unreadable:
                raise
            raise PresetError(
                f"Preset {preset!r}: unreadable weights file (truncated or corrupt): "
                f"{'; '.join(unreadable)}. Save or download the preset again."
            ) from error
