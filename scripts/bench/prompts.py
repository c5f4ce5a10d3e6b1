"""The fixed prompt set: short, different user questions on varied topics (same list for every system).

Also the longer prompts of the capacity and shared-prefix workloads, built deterministically from them.
"""

from __future__ import annotations

import random
from collections.abc import Callable

PROMPTS: list[str] = [
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about a cat sleeping in the sun.",
    "What are three tips for keeping houseplants alive?",
    "Summarize the plot of Romeo and Juliet briefly.",
    "How does a refrigerator keep food cold?",
    "Give me a simple recipe for pancakes.",
    "What is the difference between a virus and a bacterium?",
    "Suggest a name for a small bakery by the sea.",
    "Why do leaves change color in autumn?",
    "Write a short motivational message for a student before an exam.",
    "What is the Pythagorean theorem? Give an example.",
    "Describe the water cycle to a ten-year-old.",
    "List four planets of the solar system and one fact about each.",
    "How do I reverse a list in Python?",
    "What should I pack for a weekend hiking trip?",
    "Explain what inflation means in economics.",
    "Write a limerick about a forgetful robot.",
    "Why is regular sleep important for health?",
    "What is photosynthesis?",
    "Give three ideas for a rainy-day activity with kids.",
    "How do airplanes stay in the air?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "What was the Renaissance, in a few sentences?",
    "Recommend a strategy for learning a new language.",
    "Explain the rules of tic-tac-toe.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Describe a sunset over the mountains in three sentences.",
    "How do vaccines train the immune system?",
    "Write a polite email asking a colleague for a meeting next week.",
    "What are prime numbers? List the first five.",
    "Give two arguments for and against working from home.",
    "How does a compass find north?",
    "Explain what a black hole is in simple words.",
    "What are some healthy snacks for the afternoon?",
    "Write a two-line poem about the ocean.",
    "How does recycling plastic help the environment?",
    "What is the difference between weather and climate?",
    "Describe how to tie a basic knot for shoelaces.",
    "Why do we have leap years?",
    "Tell me a fun fact about octopuses.",
]


# --- Longer prompts, made deterministically from the questions above (same text for every system). ---

TokenCounter = Callable[[str], int]

SYSTEM_PREAMBLE = (
    "You are the assistant of a help desk for a school. Answer the user's question in a few friendly sentences. "
    "The reference notes below list questions students asked before; use them as background only."
)


def fill_text(start: str, target_tokens: int, rng: random.Random, count_tokens: TokenCounter) -> str:
    """``start`` followed by shuffled questions, then single words, while the text stays ≤ ``target_tokens``."""
    text = start
    while True:
        sentences = PROMPTS[:]
        rng.shuffle(sentences)
        for sentence in sentences:
            candidate = f"{text} {sentence}"
            if count_tokens(candidate) <= target_tokens:
                text = candidate
                continue
            for word in sentence.split():  # top up word by word to land close to the target
                candidate = f"{text} {word}"
                if count_tokens(candidate) > target_tokens:
                    return text
                text = candidate
            return text


def capacity_prompts(n: int, min_tokens: int, max_tokens: int, count_tokens: TokenCounter, seed: int = 18) -> list[str]:
    """``n`` different user prompts of ``min_tokens``..``max_tokens`` tokens, each opening differently.

    Each starts with its own request number and a different shuffle of the questions, so no two share more
    than a few leading tokens and a prefix cache cannot help.
    """
    rng = random.Random(seed)
    prompts = []
    for index in range(n):
        target = rng.randint(min_tokens, max_tokens)
        start = f"Request {index + 1}: read these notes, then answer the last question."
        prompts.append(fill_text(start, target, rng, count_tokens))
    return prompts


def shared_system_prompt(target_tokens: int, count_tokens: TokenCounter, seed: int = 7) -> str:
    """The fixed, long system prompt of the shared-prefix workload (≤ ``target_tokens`` tokens, close to it)."""
    return fill_text(SYSTEM_PREAMBLE + " Notes:", target_tokens, random.Random(seed), count_tokens)


def with_system(system: str, questions: list[str]) -> list[list[dict[str, str]]]:
    """Each question as a two-message chat under the same system prompt."""
    return [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in questions]


# --- The speculative workload: answers that copy from the prompt (n-gram prompt lookup finds them there). ---

NOTE = (
    "Hi team, the quarterly review moves from Tuesday the 4th to Thursday the 6th at 10:00 in room 204. "
    "Please bring the updated sales figures, the hiring plan for the support desk, and your notes on the new "
    "billing system. Lunch will be provided. Contact Maria Lopez (maria.lopez@example.com, +1 555 0142) with "
    "any questions before Wednesday noon."
)
CODE = """def load_orders(path):
    orders = []
    with open(path) as handle:
        for line in handle:
            order_id, customer, amount = line.strip().split(",")
            orders.append({"id": order_id, "customer": customer, "amount": float(amount)})
    return orders


def load_customers(path):
    customers = []
    with open(path) as handle:
        for line in handle:
"""

COPY_PROMPTS: list[str] = [
    f"Rewrite this note exactly, changing only 'Thursday the 6th' to 'Friday the 7th':\n\n{NOTE}",
    f"Fix any typos in this note and return the full corrected text:\n\n{NOTE.replace('the', 'teh', 3)}",
    f"Extract the fields meeting_day, time, room, contact_name, contact_email and contact_phone as JSON:\n\n{NOTE}",
    f"Continue this Python code in the same style:\n\n{CODE}",
    f"Repeat this note word for word, then add one line that says 'Thanks, Alex':\n\n{NOTE}",
    f"Add a one-line docstring to each function and return the whole file:\n\n{CODE}",
    f"Turn this note into a bulleted list, keeping its wording:\n\n{NOTE}",
    f"Rename the variable 'handle' to 'source' everywhere and return the code:\n\n{CODE}",
]
