"""The weight file formats an audit reads, without running code from the file.

:mod:`~cluster_tracking.audit.formats.detect` chooses the reader by a file's content:
:mod:`~cluster_tracking.audit.formats.safetensors`, ``torch.save`` files
(:mod:`~cluster_tracking.audit.formats.torch_file`, with inert stand-ins for what a pickle names,
:mod:`~cluster_tracking.audit.formats.stand_ins`, and the pre-1.6 format's budget,
:mod:`~cluster_tracking.audit.formats.legacy`), ``torch.export`` archives
(:mod:`~cluster_tracking.audit.formats.pt2`), TorchScript, and MLflow model folders
(:mod:`~cluster_tracking.audit.formats.mlflow_model`);
:mod:`~cluster_tracking.audit.formats.checkpoint` finds the weights inside what a pickle held.
"""
