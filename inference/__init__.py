"""Pixels to result to report: the runtime the node's workers and ``triagenode infer`` use.

The runtime (input spec, device, preprocessing, loader, architectures, model
package, the per-study pipeline, the SR builder) apart from the model
lifecycle (phantoms, training, evaluation, metrics), which the node never
imports; the layers contract in ``pyproject.toml`` holds both to it.
"""
