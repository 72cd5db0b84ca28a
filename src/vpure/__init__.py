"""vpure: adversarial-video defences in front of a video recogniser.

``vpure.runtime`` is what an edge box runs (configuration, models, backends, detection,
repair, purification, the stream runner and the ``vpure`` command line),
``vpure.kernels`` the native, Triton and torch kernels it calls, and ``vpure.export``
the exporter that turns components into ONNX and TensorRT engines. Importing this
package imports none of them.
"""
