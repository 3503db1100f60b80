"""The bundled presets: one keras-hub preset folder per name.

Installed as `keras_vmoe.bundled_presets` (see pyproject.toml), so the
folders ship in the wheel; `keras_vmoe.presets` resolves their names.
"""
