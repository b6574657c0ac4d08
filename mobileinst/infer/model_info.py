"""What image and video predictors share about the trained model they run: its `ModelInfo`
(`mobileinst.models.model_info`, where the description and the export metadata are written and
read)."""
from __future__ import annotations

from ..models.model_info import ModelInfo


class Described:
    """What image and video predictors share: the trained model's names and ids from `info`."""

    info: ModelInfo

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    @property
    def cat_ids(self) -> list[int]:
        return list(self.info.cat_ids)
