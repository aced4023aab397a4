"""pair_cls: one class per text pair ([CLS] a [SEP] b [SEP], token_type_ids)."""
from __future__ import annotations

from tenure.engine.tasks.kinds.seq_cls import CLASSIFICATION_METRICS, SeqCls

KIND = SeqCls("pair_cls", "pair_cls", ("pair",), "accuracy", "max", CLASSIFICATION_METRICS, labelled=True,
              pack="batch", kl_unit="example", classifies=True, fisher_classes=True)
