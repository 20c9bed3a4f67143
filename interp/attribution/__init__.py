"""Localisation methods over shared sites: exact patching, attribution patching, LRP rules."""
