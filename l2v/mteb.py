"""MTEB (mteb 2.x) over an l2v `Encoder`: `MTEBModel` implements mteb's encoder protocol (`encode(inputs:
DataLoader, *, task_metadata, hf_split, hf_subset, prompt_type)`, `similarity`, a `ModelMeta`), with
upstream llm2vec's instructions: its task-to-instruction table (`l2v/mteb_instructions.py`), else the
task's own query prompt, made to end with ':' as upstream's evaluation did. Queries and both sides of
symmetric tasks (STS, classification, clustering, pair classification) carry the instruction; retrieval
and reranking corpora (prompt_type "document") do not.

mteb is an optional dependency, imported when an `MTEBModel` is built or a task is looked up.

    import mteb
    from l2v.mteb import MTEBModel
    model = MTEBModel("McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp",
                      adapters=["McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp-supervised"],
                      dtype="bfloat16", pooling="mean", is_causal=False, prompt="")
    mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark"]))
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .encoder import Encoder, default_batch_tokens
from .hub import is_hub_id
from .mteb_instructions import TASK_INSTRUCTIONS

INSTALL = "pip install 'mteb>=2,<3'"


def require_mteb():
    """The mteb module, or one line saying how to install it."""
    try:
        import mteb
    except ImportError:
        raise ImportError(f"evaluating on MTEB needs the mteb package: {INSTALL}") from None
    major = str(getattr(mteb, "__version__", "2")).split(".")[0]
    if major != "2":
        raise ImportError(
            f"l2v.mteb implements mteb 2.x's encoder protocol, found mteb {mteb.__version__}: " + INSTALL
        )
    return mteb


def llm2vec_instruction(instruction: str) -> str:
    """Upstream's rule: an instruction ends with ':' (a trailing '.' becomes ':')."""
    if instruction and not instruction.endswith(":"):
        instruction = instruction.strip(".") + ":"
    return instruction


def task_prompt(task_metadata) -> str:
    """The task's own instruction for its queries (mteb's metadata prompt, else its task type's)."""
    prompt = task_metadata.prompt
    if isinstance(prompt, dict):
        prompt = prompt.get("query")
    if not prompt:
        from mteb.abstasks.abstask import get_abstask_prompt

        prompt = get_abstask_prompt(task_metadata.name)
    return prompt or ""


def instruction_for(task_metadata, prompt_type=None, table: dict = TASK_INSTRUCTIONS) -> str:
    """What a task's inputs on one side are encoded with: '' for a retrieval corpus, else the table's
    instruction for the task, else the task's own prompt ending in ':'."""
    if getattr(prompt_type, "value", prompt_type) == "document":
        return ""
    if task_metadata.name in table:
        return table[task_metadata.name]
    return llm2vec_instruction(task_prompt(task_metadata))


def default_name(model, adapters) -> str:
    """mteb wants an `org/name`: a hub id as it is, else l2v/<folder names joined by '+'>."""
    if is_hub_id(model) and not adapters:
        return str(model)
    return "l2v/" + "+".join(Path(str(p)).name for p in [model, *adapters])


class MTEBModel:
    """An l2v encoder as an mteb 2.x model. `model`: a model folder or hub id (with `adapters` and the keyword
    arguments of `Encoder.from_pretrained`: pooling, dtype, autocast, is_causal, prompt, ...) or an
    `Encoder`. `instructions` adds to or overrides upstream's table, by task name. `max_batch_tokens`: tokens
    per forward pass (default: mteb's batch_size x max_length, at most Encoder's default)."""

    def __init__(
        self,
        model,
        adapters=(),
        instructions: dict | None = None,
        name: str | None = None,
        max_batch_tokens: int | None = None,
        **kwargs,
    ):
        require_mteb()
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        # Checked before a model loads: each would otherwise fail only at the first task's encode.
        if instructions is not None and not (
            isinstance(instructions, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in instructions.items())
        ):
            raise TypeError(f"instructions must be a dict of task name -> instruction, got {instructions!r}")
        integral = isinstance(max_batch_tokens, (int, np.integer)) and not isinstance(max_batch_tokens, bool)
        if max_batch_tokens is not None and not (integral and max_batch_tokens >= 1):
            raise ValueError(f"max_batch_tokens must be a positive integer or None, got {max_batch_tokens!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string (org/name) or None, got {name!r}")
        if isinstance(model, Encoder):
            if adapters or kwargs:
                raise ValueError("MTEBModel(encoder): adapters and settings go to Encoder.from_pretrained")
            self.encoder = model
        else:
            # one folder, or a list of them; anything else goes on to Encoder's check, which names it
            adapters = [adapters] if isinstance(adapters, (str, os.PathLike)) else adapters
            adapters = list(adapters) if isinstance(adapters, (list, tuple)) else adapters
            self.encoder = Encoder.from_pretrained(model, adapters=adapters, **kwargs)
        self.instructions = {**TASK_INSTRUCTIONS, **(instructions or {})}
        self.max_batch_tokens = max_batch_tokens
        self.calls: list[dict] = []  # one record per encode call: task, side, instruction, text count
        cfg = self.encoder.model.config
        self.mteb_model_meta = ModelMeta.create_empty(
            overwrites=dict(
                name=name
                or (default_name(model, adapters) if not isinstance(model, Encoder) else "l2v/encoder"),
                embed_dim=cfg.dim,
                max_tokens=self.encoder.max_length,
                similarity_fn_name=ScoringFunction.COSINE,
                use_instructions=True,
                framework=["PyTorch"],
                n_parameters=sum(p.numel() for p in self.encoder.model.parameters()),
            )
        )

    def instruction(self, task_metadata, prompt_type=None) -> str:
        return instruction_for(task_metadata, prompt_type, self.instructions)

    def encode(
        self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs
    ) -> np.ndarray:
        """mteb's batches ({"text": [...]}) -> float32 [N, dim] in order. An empty text (an untitled,
        empty corpus document) gets a zero vector: it scores 0 against everything, as in eval.py."""
        texts = [t for batch in inputs for t in batch["text"]]
        instruction = self.instruction(task_metadata, prompt_type)
        side = getattr(prompt_type, "value", prompt_type)
        self.calls.append(
            {"task": task_metadata.name, "prompt_type": side, "instruction": instruction, "n": len(texts)}
        )
        device = self.encoder.model.embed_tokens.weight.device
        budget = self.max_batch_tokens or min(
            int(kwargs.get("batch_size") or 32) * self.encoder.max_length, default_batch_tokens(device)
        )
        out = np.zeros((len(texts), self.encoder.model.config.dim), dtype=np.float32)
        keep = [i for i, t in enumerate(texts) if t.strip()]
        if keep:
            out[keep] = self.encoder.encode(
                [(instruction, texts[i]) for i in keep],
                max_batch_tokens=budget,
                show_progress=bool(kwargs.get("show_progress_bar", False)),
            )
        return out

    def similarity(self, embeddings1, embeddings2):
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)


def get_tasks(names) -> list:
    """MTEB task objects by name ("STSBenchmark,SICK-R" or a list); an unknown name is one ValueError."""
    mteb = require_mteb()
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    tasks = []
    for name in names:
        try:
            tasks.append(mteb.get_task(name))
        except KeyError as e:  # mteb's message names the task and close matches
            message = str(e.args[0] if e.args else name).removeprefix("KeyError: ")
            raise ValueError(f"--mteb: {message}") from None
    if not tasks or not all(names):
        raise ValueError(f"--mteb {','.join(names)!r}: expected comma-separated MTEB task names")
    return tasks


def load_data(task) -> None:
    """A task's data, fetched now (before a model loads) unless it is there already."""
    if not task.data_loaded:
        try:
            task.load_data()
        except Exception as e:  # datasets/hub errors of many kinds: the task and the cause, in one line
            raise OSError(
                f"--mteb {task.metadata.name}: cannot load its data ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})"
            ) from None


def run(model: MTEBModel, tasks, output_folder=None, show_progress: bool = False) -> list[dict]:
    """Each task through `mteb.evaluate` -> [{"task": "mteb/<name>", "kind": "mteb", "n", "seconds",
    "scores": {<main score>: x100}, "instructions": {side: instruction}}], like eval.py's local results; n
    counts the inputs of the first side encoded (STS pairs, retrieval queries); a side is query, document or
    both. mteb's own result files go to `output_folder`, if given."""
    mteb = require_mteb()
    cache = mteb.ResultCache(cache_path=output_folder) if output_folder is not None else None
    results = []
    for task in tasks:
        t0, first = time.perf_counter(), len(model.calls)
        result = mteb.evaluate(
            model,
            task,
            cache=cache,
            overwrite_strategy="always",
            co2_tracker=False,
            show_progress_bar=show_progress,
            encode_kwargs={"batch_size": 32, "show_progress_bar": show_progress},
        )
        score = result.task_results[0].get_score()
        calls = model.calls[first:]
        sides = [c["n"] for c in calls if c["prompt_type"] != "document"]
        results.append(
            {
                "task": f"mteb/{task.metadata.name}",
                "kind": "mteb",
                "n": sides[0] if sides else 0,
                "seconds": time.perf_counter() - t0,
                "scores": {task.metadata.main_score: 100.0 * float(score)},
                "instructions": {c["prompt_type"] or "both": c["instruction"] for c in calls},
            }
        )
    return results
