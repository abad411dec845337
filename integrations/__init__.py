"""Integrations with tracking platforms and training frameworks (imported lazily)."""
