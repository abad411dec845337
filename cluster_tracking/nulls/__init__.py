"""Null models: shuffled and re-initialised copies of a network, and the statistics against them."""
