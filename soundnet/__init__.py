"""SoundNet: sound representations distilled from vision networks on unlabeled video.

The stage folders of the repository are the subpackages of this one import root: ``soundnet.ingest``,
``soundnet.teachers``, ``soundnet.shards``, ``soundnet.student``, ``soundnet.evaluate``.

Features for everyone (:mod:`soundnet.api`): ``soundnet.load_model(path)``,
``soundnet.embed(model, audio, sample_rate, layer)`` and ``soundnet.embed_many`` (many clips, batched); the HEAR
2021 API is :mod:`soundnet.hear`.
"""

from typing import Any

__all__ = ["embed", "embed_many", "load_model"]


def __getattr__(name: str) -> Any:
    # imported on first use: the stage packages (training above all) must not pull in PyAV through the root package
    if name in __all__:
        from soundnet import api

        return getattr(api, name)
    raise AttributeError(f"module 'soundnet' has no attribute {name!r}")
