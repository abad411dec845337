"""Measuring during training: the tracker, its sinks and the spool that delivers to them."""
