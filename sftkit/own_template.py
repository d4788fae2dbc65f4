"""Chat templates checked by rendering probe conversations. The model's own chat template as a Template: a date it
reads from the clock pinned, {% generation %} tags added where it has none (Meta's Llama 3.x layout by sftkit, other
known layouts by TRL) and kept only where the tagged text renders as the original does, and the token that ends an
assistant turn. A template file's turns, and the data's, checked against what the template renders or refuses.
"""

import datetime
import re

from jinja2 import TemplateError

from .errors import UserError
from .prompts import OWN, TAGS, Template, own_text, refusal, render_chat

# Meta's Llama 3.1 / 3.2 / 3.3 templates write every plain turn with this one expression; the tagged version writes
# the header the same way and wraps an assistant's content and <|eot_id|> in generation tags.
LLAMA3_TURN = re.compile(r"\{\{-?\s*'<\|start_header_id\|>'\s*\+\s*message\['role'\]\s*\+\s*'<\|end_header_id\|>"
                         r"\\n\\n'\s*\+\s*message\['content'\]\s*\|\s*trim\s*\+\s*'<\|eot_id\|>'\s*-?\}\}")
LLAMA3_TAGGED = ("{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
                 "{%- if message['role'] == 'assistant' %}{% generation %}"
                 "{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
                 "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}")
PROBES = ([{"role": "user", "content": "안녕하세요?"}, {"role": "assistant", "content": "네, 반갑습니다."}],
          [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is 2+2?"},
           {"role": "assistant", "content": "4."}, {"role": "user", "content": "고마워"},
           {"role": "assistant", "content": " 천만에요! "}])
# Contents no template writes by itself, in lower case without spaces so that | trim, | lower and | tojson keep them.
PROBE = [{"role": "system", "content": "probe-system-7341"}, {"role": "user", "content": "probe-user-7341"},
         {"role": "assistant", "content": "probe-assistant-7341"}]


def from_tokenizer(tokenizer, name: str = OWN) -> Template:
    """A chat Template from the tokenizer's own chat_template. Where it has no {% generation %} tags, tags are added
    (Meta's Llama 3.x layout by sftkit, other known layouts by TRL) and kept only if the tagged text renders every
    probe conversation exactly as the original and its mask equals the one found by rendering prefixes. A date the
    template would take from the clock is pinned, so that inference renders the system block as training did."""
    own = own_text(tokenizer)
    if not own:
        raise UserError(f"{getattr(tokenizer, 'name_or_path', 'the model')} has no chat template of its own: pass "
                        "--prompt llama-3.1-chat (or chatml), or --prompt auto.")
    own = pin_date(own)
    text = own if TAGS.search(own) else next((c for c in tag_candidates(tokenizer, own)
                                               if same_rendering(tokenizer, own, c)), own)
    stop = end_of_turn(tokenizer, text)
    return Template(name, "chat", f"{{#- stop: {stop} -#}}\n{text}", stop=stop)


def pin_date(text: str) -> str:
    today = datetime.date.today().strftime("%d %b %Y")  # Llama 3.2's template reads the clock for its system block
    pin = f'{{%- if date_string is not defined %}}{{%- set date_string = "{today}" %}}{{%- endif %}}\n'
    return pin + text if "strftime_now" in text else text


def tag_candidates(tokenizer, text: str):
    if len(LLAMA3_TURN.findall(text)) == 1:
        yield LLAMA3_TURN.sub(lambda _: LLAMA3_TAGGED, text)
    try:  # TRL knows tagged versions of many models' templates (Qwen, Gemma, Phi-3, Llama 3.0 ...), not Llama 3.1
        from trl.chat_template_utils import get_training_chat_template

        original, tokenizer.chat_template = tokenizer.chat_template, text
        try:
            found = get_training_chat_template(tokenizer)
        finally:
            tokenizer.chat_template = original
    except (ImportError, ValueError):
        found = None
    if found:
        yield found


def probes(tokenizer, text: str) -> tuple:
    """PROBES as this template takes them: where it refuses the system turn (raise_exception, as Gemma's and
    Mistral's templates do), the second without it, since data trained with such a template have none either."""
    try:
        tokenizer.apply_chat_template(PROBES[1], chat_template=text, tokenize=False)
    except TemplateError:
        return PROBES[0], [m for m in PROBES[1] if m["role"] != "system"]
    return PROBES


def same_rendering(tokenizer, original: str, tagged: str) -> bool:
    """The tagged template renders each probe as the original does, and its tags mark the assistant spans that
    rendering prefixes finds (content and end-of-turn token)."""
    try:
        for msgs in probes(tokenizer, original):
            for m, gen in ((msgs, False), (msgs[:-1], True)):
                a, b = (tokenizer.apply_chat_template(m, chat_template=t, tokenize=False, add_generation_prompt=gen)
                        for t in (original, tagged))
                if a != b:
                    return False
            out = tokenizer.apply_chat_template(msgs, chat_template=tagged, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            ids, mask = prefix_mask(tokenizer, msgs, original)
            # Whitespace at a turn's edges may fall either side (TRL's Qwen template marks the header's newline).
            solid = [bool(tokenizer.decode([i]).strip()) for i in ids]
            if [m and s for m, s in zip(out["assistant_masks"], solid)] != [m and s for m, s in zip(mask, solid)]:
                return False
    except Exception:  # noqa: BLE001 - a template that fails on a probe is no safe replacement
        return False
    return True


def prefix_mask(tokenizer, messages: list, chat_template=None) -> tuple[list, list]:
    """(token ids, 1 for each token an assistant wrote) found by rendering prefixes: an assistant turn is what the
    conversation up to it adds after the generation prompt, less trailing whitespace. Needs a template that renders
    a conversation's prefixes as prefixes of its tokens; raises UserError where it does not."""
    def ids(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, chat_template=chat_template, tokenize=True, return_dict=True,
                                             add_generation_prompt=gen)["input_ids"]

    full = list(ids(messages))
    mask = [0] * len(full)
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before, upto = list(ids(messages[:i], gen=True)) if i else [], list(ids(messages[:i + 1]))
        if full[:len(before)] != before or full[:len(upto)] != upto:
            raise UserError("the chat template renders a conversation's first turns differently once more turns "
                            "follow, so the assistant turns cannot be located: pass --train_on_inputs.")
        end = len(upto)
        while end > len(before) and not tokenizer.decode(full[end - 1:end]).strip():
            end -= 1
        mask[len(before):end] = [1] * (end - len(before))
    return full, mask


def end_of_turn(tokenizer, text: str) -> str:
    """The token that closes an assistant turn in this template: the last of a probe's assistant turn, where it is
    one of the tokenizer's added tokens (e.g. <|eot_id|>); the tokenizer's EOS where none is found."""
    try:
        full, mask = prefix_mask(tokenizer, PROBES[0], text)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe ends turns with nothing sftkit knows
        return tokenizer.eos_token
    last = full[len(mask) - 1 - mask[::-1].index(1)] if 1 in mask else None
    return tokenizer.convert_ids_to_tokens(last) if last in set(tokenizer.get_added_vocab().values()) \
        else tokenizer.eos_token


def check_turns_kept(t: Template, where: str):
    """A chat template file must write each turn's content: one that reads another key (message['text']) renders
    empty turns, and training on them fails silently. The system turn is probed only where the template takes one
    (Gemma's and Mistral's templates refuse it with raise_exception; rows with one are refused then)."""
    probe = PROBE if not refusal(t.text, PROBE) else PROBE[1:]
    why = refusal(t.text, probe)
    if why:
        raise UserError(f"{where} cannot render a plain user/assistant conversation: {why}. Fix the template so that "
                        "it renders role/content turns; prompts/chatml.jinja is a working example.")
    out = render_chat(t.text, probe)
    # A template that skips system turns (Phi-3's original) is a known layout, not a misread key: user and
    # assistant turns decide.
    lost = [m["role"] for m in probe if m["content"] not in out and m["role"] != "system"]
    if lost:
        which = " and ".join(filter(None, [", ".join(lost[:-1]), lost[-1]]))
        many = len(lost) > 1
        raise UserError(f"{where} drops the content of the {which} turn{'s' * many}: a probe conversation renders "
                        f"without {'them' if many else 'it'}, so training would see empty turns. The usual cause is "
                        "reading a key other than 'content' (message['text'], message['value']) or content as a list "
                        "of parts (vision models' templates): sftkit passes role/content turns with text content, so "
                        "write message['content'].")


def answered(turns) -> bool:
    """A conversation with an assistant turn that says something: the rows chat training keeps."""
    return any(m["role"] == "assistant" and str(m["content"]).strip() for m in turns)


def check_conversations(t: Template, conversations):
    """Each row's turns as the chat template takes them, before the model loads: a template that refuses turns
    (raise_exception: a system turn, or turns that do not alternate, in Gemma's and Mistral's templates) is named
    with the row here, not as a Jinja traceback once training starts. Such refusals depend on the roles, so one row
    per distinct sequence of roles is rendered."""
    seen = set()
    for index, turns in enumerate(conversations):
        if not answered(turns):
            continue  # dropped with the other empty rows (and [] would fail templates reading turn 0)
        roles = tuple(m["role"] for m in turns)
        why = "" if roles in seen else refusal(t.text, turns)
        seen.add(roles)
        if why:
            fix = ("drop the system turns from the data, or pick a template that has one (--prompt llama-3.1-chat "
                   "or chatml)" if "system" in roles else "make its turns alternate user/assistant, starting with "
                   "the user, or pick another --prompt")
            raise UserError(f"row {index}: chat template {t.name!r} refuses its turns ({', '.join(roles)}): {why}. "
                            f"Fix: {fix}.")
