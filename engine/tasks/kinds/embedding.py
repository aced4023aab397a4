"""embedding: query and passages [positive, hard negatives...] embedded separately, InfoNCE.

Scored on every passage of the split as candidates (recall@k, MRR, nDCG@k). Its Fisher is that
of the per-example choice p(j | query) = softmax_j(q . p_j / temperature) among the record's own
candidates, the positive (index 0) being the label: records need at least one hard negative. Its
head has no weights, so it may be scored evaluation-only on a run that trains another head."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tenure.engine.tasks import losses, metrics
from tenure.engine.tasks.kinds.base import ClassKind
from tenure.models.errors import TenureError

RETRIEVAL_KS = (1, 5, 10)


class Embedding(ClassKind):
    def features(self, featurizer, records, locations, rngs):
        return featurizer.retrieval(records)

    def loss(self, cfg=None):
        return losses.info_nce(getattr(cfg, "temperature", 0.05))

    def reduce(self, outputs, batch):
        return dict(query=outputs["query_embeddings"].astype(jnp.float32),
                    passage=outputs["passage_embeddings"][:, 0].astype(jnp.float32), mask=batch["example_mask"])

    def scores(self, got, label_names):
        scores_QxP = got["query"] @ got["passage"].T  # candidates: every passage in the split
        return metrics.retrieval_metrics(scores_QxP, np.arange(len(scores_QxP)), ks=RETRIEVAL_KS)

    def choice_logits(self, outputs, temperature):
        if outputs["passage_embeddings"].shape[1] < 2:
            raise TenureError("fisher: an embedding task's Fisher needs retrieval records with hard "
                              "negatives (one passage per query leaves nothing to choose)")
        scores_BxP = jnp.einsum("bd,bpd->bp", outputs["query_embeddings"].astype(jnp.float32),
                                outputs["passage_embeddings"].astype(jnp.float32))
        return {"logits": scores_BxP / temperature}


KIND = Embedding("embedding", "embedding", ("retrieval",), "recall@1", "max",
                 ("mrr", *(f"{name}@{k}" for k in RETRIEVAL_KS for name in ("recall", "ndcg"))),
                 pooling="mean", probe_head=True, fisher_classes=True)
