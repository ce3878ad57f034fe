"""Language-model targets (LM): next-token cross-entropy on the answers of generative targets
(`vlm_jax.data.generative`: a caption, a grounding answer `<ref>..</ref><box>[[..]]</box>`, a relation word).

The model runs the language model over `lm_ids` (the chat template's prompt with the row's image tokens, then the
answer) and hands the hidden states to this task (`Features.lm_hidden`); the loss is `losses.weighted_token_loss`
over the answer tokens (`lm_labels` != -100): template, image block, question and padding never count. Logits are
formed from the hidden states in chunks of `chunk_size` positions (0 = at once), so [B, T, V] float32 logits never
exist for a long sequence. The image tiles go through the vision tower once for every task of the step.

Config (`config.tasks.lm`): weight; chunk_size; span_weights {caption, grounding, relation, box}: the weight of the
tokens of each answer span (`generative.SPANS`; the box coordinates of a grounding answer are the span "box").
Training logs the loss of each span (`lm_<span>`) and the answer tokens per batch. Evaluation (teacher forcing):
`lm_loss` and `lm_token_acc` (argmax = the answer token) over all answers and per kind (`lm_loss_caption`, ...), and
`lm_exact_<kind>`: the share of answers whose every token is the argmax. What the model *generates* is scored by
`vlm_jax.generative_eval` (parsed boxes, relations).
"""

import jax.numpy as jnp
import numpy as np

from vlm_jax import losses
from vlm_jax.data import generative
from vlm_jax.tasks.base import Task


class LanguageModelTask(Task):
    name = "lm"
    reads_lm = True
    batch_fields = ("lm_kind",)
    eval_outputs = ("lm_ce_sum", "lm_tokens", "lm_correct")
    diagnostic_terms = ("tokens", *(f"{s}_tokens" for s in generative.SPANS))
    headline_metrics = ("lm_token_acc",)
    metric_names = ("lm_loss", "lm_token_acc", *(f"lm_{m}_{k}" for k in generative.KINDS
                                                  for m in ("loss", "token_acc", "exact")))

    def __init__(self, cfg, widths, *, rngs):
        super().__init__(cfg, widths, rngs=rngs)
        self.chunk_size = int(cfg.chunk_size)
        weights = dict(cfg.span_weights)
        unknown = sorted(set(weights) - set(generative.SPANS))
        if unknown:
            raise ValueError(f"tasks.lm.span_weights: unknown spans {unknown}; expected some of {generative.SPANS}")
        # Index 0: tokens outside every answer (never counted); span k + 1 = SPANS[k].
        self.span_weights = np.asarray([0.0] + [float(weights.get(s, 1.0)) for s in generative.SPANS], np.float32)

    def __call__(self, features, batch, *, train):
        ce, correct, counted = losses.token_cross_entropy(features.lm_hidden, batch["lm_labels"],
                                                          head=features.lm_head, chunk_size=self.chunk_size)
        return {"lm_ce": ce, "lm_counted": counted, "lm_ce_sum": jnp.sum(ce, axis=1),
                "lm_tokens": jnp.sum(counted, axis=1).astype(jnp.int32),
                "lm_correct": jnp.sum(correct, axis=1).astype(jnp.int32)}

    def loss(self, outputs, batch, valid):
        counted = outputs["lm_counted"] & valid[:, None]
        span = batch["lm_spans"][:, 1:]  # the span of each predicted token
        weights = jnp.asarray(self.span_weights)[span]
        spans = {name: span == k + 1 for k, name in enumerate(generative.SPANS)}
        return losses.weighted_token_loss(outputs["lm_ce"], counted, weights, spans)

    def metrics(self, collected):
        ce, tokens, correct = (np.asarray(collected[k], np.float64) for k in ("lm_ce_sum", "lm_tokens", "lm_correct"))
        kind = np.asarray(collected["lm_kind"])

        def summary(rows):
            n = max(tokens[rows].sum(), 1.0)
            exact = correct[rows] == tokens[rows]
            return ce[rows].sum() / n, correct[rows].sum() / n, float(exact.mean()) if rows.any() else float("nan")

        out = dict(zip(("lm_loss", "lm_token_acc"), summary(np.ones_like(kind, bool))[:2]))
        for k, name in enumerate(generative.KINDS):
            values = summary(kind == k) if (kind == k).any() else (float("nan"),) * 3
            out.update({f"lm_loss_{name}": values[0], f"lm_token_acc_{name}": values[1],
                        f"lm_exact_{name}": values[2]})
        return {k: float(v) for k, v in out.items()}
