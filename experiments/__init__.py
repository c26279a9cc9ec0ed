"""Experiment configs: one file each, `get_config(arg=None) -> ConfigDict`."""
