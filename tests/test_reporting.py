"""What a run shows a person: the completion table and the reward curve."""

import torch

from lightning_gspo.reporting import completion_rows

SYSTEM = "You are a careful assistant. Think step by step, then give the answer inside <answer> tags. " * 2


def test_completion_table_shows_the_question_of_a_chat_prompt():
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2+3?"}]
    completion = [{"role": "assistant", "content": "<answer>5</answer>"}]
    rows = completion_rows(
        [prompt, "7+1="], [completion, "8"], torch.tensor([[1.0], [0.0]]), ["r"], [0.5, -0.5], 2
    )
    assert rows[0]["prompt"] == "What is 2+3?" and rows[0]["completion"] == "<answer>5</answer>"
    assert rows[1]["prompt"] == "7+1=" and rows[1]["completion"] == "8"
    few_shot = [*prompt, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?" * 20}]
    (row,) = completion_rows([few_shot], ["6"], torch.tensor([[1.0]]), ["r"], [0.0], 1)
    assert (
        row["prompt"].startswith("And 3+3?") and len(row["prompt"]) == 80
    )  # the last question, cut to width
