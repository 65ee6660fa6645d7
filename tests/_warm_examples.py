"""Prints, as JSON, the prompts the official RL recipes give for "What is 2 + 2?" and two replies to each.

Run by ``official_programs.build_warm_base`` in a program's environment (``program_env``): the official
cookbook, loaded onto hpcai_async, renders each prompt exactly as the recipe does, so a model tuned on these
examples answers the recipes' own prompts. Each prompt gets a right reply (``\\boxed{4}``) and a wrong one
(``\\boxed{5}``), both in the reply format the recipe's grader accepts, ending in the renderer's stop.

* ``rl_loop``: its few-shot ``convo_prefix`` and ``question_suffix``, read from the recipe's source, with
  the Qwen3 renderer (the one it picks for ``Qwen/Qwen3-0.6B``);
* ``math_qwen3``: ``math_rl``'s ``MathEnv`` (standard few-shot prefix), Qwen3 renderer;
* ``math_role_colon``: the same environment with the ``role_colon`` renderer (``rl_basic``'s, for
  ``meta-llama/Llama-3.1-8B``, a base model).
"""

from __future__ import annotations

import ast
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from hpcai_async.cookbook.recipes.math_rl.math_env import MathEnv

from hpcai_async.cookbook import model_info, renderers, tokenizer_utils

QUESTION, ANSWER = "What is 2 + 2?", "4"
REPLIES = {"right": "\\boxed{4}", "wrong": "\\boxed{5}"}


def rl_loop_convo(recipe: Path) -> list[dict[str, str]]:
    """rl_loop's conversation for QUESTION: the literals its ``main`` assigns, evaluated, not imported."""
    source, found = recipe.read_text(), {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("question_suffix", "convo_prefix"):
                value = ast.get_source_segment(source, node.value)
                found[name] = eval(value, {}, {"question_suffix": found.get("question_suffix")})
    suffix, prefix = found["question_suffix"], found["convo_prefix"]
    return [*prefix, {"role": "user", "content": QUESTION + suffix}]


def examples(renderer: renderers.Renderer, convo: list[dict[str, str]], prompt: list[int]) -> dict[str, Any]:
    """``prompt`` (the recipe's rendering of ``convo``) and each reply's tokens after it."""
    replies = {}
    for kind, reply in REPLIES.items():
        tokens, weights = renderer.build_supervised_example([*convo, {"role": "assistant", "content": reply}])
        tokens, weights = tokens.tolist(), weights.tolist()
        start = weights.index(1) if 1 in weights else len(weights)
        assert tokens[: len(prompt)] == prompt and start == len(prompt), "the reply must follow the prompt"
        replies[kind] = tokens[len(prompt) :]
    return {"prompt": prompt, "replies": replies}


def renderer_for(model: str) -> renderers.Renderer:
    name = model_info.get_recommended_renderer_name(model)
    return renderers.get_renderer(name, tokenizer_utils.get_tokenizer(model))


def math_env_examples(renderer: renderers.Renderer) -> dict[str, Any]:
    """The environment's own first observation as the prompt."""
    env = MathEnv(QUESTION, ANSWER, renderer, convo_prefix=MathEnv.standard_fewshot_prefix())
    observation, _stop = asyncio.run(env.initial_observation())
    convo = [*MathEnv.standard_fewshot_prefix(), {"role": "user", "content": env.get_question()}]
    return examples(renderer, convo, observation.to_ints())


def main(rl_loop: Path) -> None:
    qwen3 = renderer_for("Qwen/Qwen3-0.6B")
    role_colon = renderer_for("meta-llama/Llama-3.1-8B")
    convo = rl_loop_convo(rl_loop)
    out = {
        "rl_loop": examples(qwen3, convo, qwen3.build_generation_prompt(convo).to_ints()),
        "math_qwen3": math_env_examples(qwen3),
        "math_role_colon": math_env_examples(role_colon),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
