"""Probes measure: each owns one family of quantities and the hooks it needs."""
