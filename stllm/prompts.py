"""Prompt formats of the original's inference scripts, as named presets (plain Python, no torch).

The visual tokens always come first; then BOS (the released tokenizer's `</s>`, id 2) and the rendered
template. What each of the original's scripts sends (commit ae45258):
- `conversation` — the chat demo, ActivityNet-QA and VideoChatGPT-Bench (`Chat.answer`, `system=True`):
  system text + "###Human: {question} ###Assistant: ", repetition penalty 1.5.
- `qa` — MSVD-QA and MSRVTT-QA (`system=False`): "###Human: {question} ###Assistant: ", penalty 1.5.
- `mvbench` — MVBench (`infer_mvbench` with `ask_simple`): the multiple-choice system text inside the human
  turn, the suffix "\\nOnly give the best option.", the answer prefix "Best option:(" at penalty 1.0; the
  answer is the first line of the output after "(".
The Q-Former always reads the question alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Prompt text of the released conversation / QA weights (`CONV_instructblip_Vicuna0.system`).
DEFAULT_SYSTEM_PROMPT = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
    "movement of objects, and the action and pose of persons. Based on your observations, give your answer "
    "that best addresses the question.\n"
)
MVBENCH_SYSTEM_PROMPT = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
    "movement of objects, and the action and pose of persons. Based on your observations, select the best "
    "option that accurately addresses the question.\n"
)
CHAT_TEMPLATE = "{system}###Human: {question} ###Assistant: {answer_prefix}"
MVBENCH_TEMPLATE = "###Human: {system}{question}\nOnly give the best option.\n###Assistant: {answer_prefix}"


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes the LLM's text prompt, and how the output becomes the answer.

    system: None = the checkpoint's system text (`STLLMConfig.system_prompt`, the released one by default).
    template: holds `{question}`, and may hold `{system}` and `{answer_prefix}`.
    answer_prefix: text the assistant's turn starts with (the model continues it).
    return_prefix: text put before the returned answer (MVBench's "(" so answers read "(A) ...").
    first_line: keep only the answer's first line (MVBench drops explanations).
    repetition_penalty: None = the checkpoint's default (1.5); an explicit decoding option wins over both.
    """

    name: str = "conversation"
    system: str | None = None
    template: str = CHAT_TEMPLATE
    answer_prefix: str = ""
    return_prefix: str = ""
    first_line: bool = False
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        if "{question}" not in self.template:
            raise ValueError("a prompt template must contain {question}")
        try:
            self.template.format(system="", question="", answer_prefix="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"prompt template {self.template!r}: only {{system}}, {{question}} and "
                             f"{{answer_prefix}} may appear ({e})") from None

    def render(self, question: str, default_system: str) -> str:
        system = default_system if self.system is None else self.system
        return self.template.format(system=system, question=question, answer_prefix=self.answer_prefix)

    def clean_answer(self, text: str) -> str:
        """The decoded output (already cut at the stop string) → the answer users see."""
        text = text.strip()
        if self.first_line:
            text = text.split("\n")[0]
        return self.return_prefix + text

    def with_overrides(self, system: str | None = None, answer_prefix: str | None = None) -> PromptFormat:
        changes = {k: v for k, v in (("system", system), ("answer_prefix", answer_prefix)) if v is not None}
        return replace(self, name=self.name + ("+custom" if changes else ""), **changes) if changes else self


PRESETS: dict[str, PromptFormat] = {
    "conversation": PromptFormat("conversation"),
    "qa": PromptFormat("qa", system=""),
    "mvbench": PromptFormat("mvbench", system=MVBENCH_SYSTEM_PROMPT, template=MVBENCH_TEMPLATE,
                            answer_prefix="Best option:(", return_prefix="(", first_line=True,
                            repetition_penalty=1.0),
}
DEFAULT_PROMPT = PRESETS["conversation"]


def prompt_format(preset: str = "conversation", system: str | None = None,
                  answer_prefix: str | None = None) -> PromptFormat:
    """A named preset, with the system text and/or answer prefix replaced by free text when given."""
    if preset not in PRESETS:
        raise ValueError(f"prompt preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return PRESETS[preset].with_overrides(system=system, answer_prefix=answer_prefix)


__all__ = ["PromptFormat", "PRESETS", "DEFAULT_PROMPT", "DEFAULT_SYSTEM_PROMPT", "MVBENCH_SYSTEM_PROMPT",
           "prompt_format"]
