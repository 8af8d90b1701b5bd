"""DPR inference engine: load an export folder, recommend in batches, serve with a dynamic batcher.

    from dpr.engine import Engine, DynamicBatcher
    engine = Engine.load("model-onnx")
    recs = engine.recommend([["1", "2", "3"]], prompts=["more comedy"], k=10)
"""

if __name__ != "dpr.engine":  # imported as the bare name 'engine': never this folder (dpr/_bare_name.py)
    from dpr._bare_name import defer_to_installed

    defer_to_installed(__name__, __file__)
else:
    from .batch import RequestBatch, ResultBatch  # noqa: F401
    from .engine import Engine, Recommendation, Recommendations, Request  # noqa: F401
    from .errors import BackendError, ClosedError, ExportFolderError, OverloadedError  # noqa: F401
    from .manifest import ExportFolder, load_export  # noqa: F401
    from .prompt_cache import PromptCache  # noqa: F401

    def __getattr__(name):
        if name == "DynamicBatcher":
            from .batcher import DynamicBatcher
            return DynamicBatcher
        raise AttributeError(name)

    __all__ = ["Engine", "Recommendation", "Recommendations", "Request", "RequestBatch", "ResultBatch",
               "DynamicBatcher", "OverloadedError",
               "BackendError", "ClosedError", "ExportFolderError", "ExportFolder", "load_export", "PromptCache"]
