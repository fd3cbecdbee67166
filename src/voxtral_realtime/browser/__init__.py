"""The browser export: the model as two ONNX step graphs that a static page runs with onnxruntime-web.

``graphs`` (the exportable step modules) -> ``export`` (ONNX files, shards, manifest) -> ``runner`` (the same
steps on onnxruntime, for the parity check) and ``page`` (the page's files, and serving them).
"""

from .export import QUANTS, estimate_export_bytes, export_web, read_manifest, require_onnx
from .page import copy_page, mount_local, npm_pack_onnxruntime_web
from .runner import OnnxEngine, WebExport, step_agreement

__all__ = ["QUANTS", "OnnxEngine", "WebExport", "copy_page", "estimate_export_bytes", "export_web", "mount_local",
           "npm_pack_onnxruntime_web", "read_manifest", "require_onnx", "step_agreement"]
