"""Audits of saved models: sources (files, folders, registered platform schemes), the audit run,
comparisons and result bundles."""
