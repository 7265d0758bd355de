"""The one configuration model and everything derived from it: TOML, presets, overrides, importers."""
