"""vpure.export: registry-driven ONNX export (fp32, fp16, int8) with named artefacts and sidecars.

Imported lazily so ``vpure.export.cli`` can register its arguments without loading onnx.
"""


def __getattr__(name):
    if name == "export_component":
        from .exporter import export_component

        return export_component
    raise AttributeError(name)


__all__ = ["export_component"]
