"""The paper-style SGLang programs the frontend tests run (test_programs.py on both backends; test_tracer.py traces
some of them)."""

from __future__ import annotations

import pydantic

import radixflow as sgl

# -- ReAct: select drives the control flow ----------------------------------------------------------------------
REACT_EXAMPLE = """Question: Which country does the founder of Microsoft live in?
Thought 1: I need to search for the founder of Microsoft.
Action 1: Search [Founder of Microsoft].
Observation 1: The founder of Microsoft is Bill Gates.
Thought 2: I need to search for the country where Bill Gates lives in.
Action 2: Search [Where does Bill Gates live].
Observation 2: Bill Gates lives in the United States.
Thought 3: The answer is the United States.
Action 3: Finish [United States].

"""


CHARACTER_REGEX = (r'\{"name": "[A-Za-z ]{1,24}", "house": "(Gryffindor|Slytherin|Ravenclaw|Hufflepuff)", '
                   r'"blood status": "(Pure-blood|Half-blood|Muggle-born)", "wand": \{"wood": "[a-z ]{1,16}", '
                   r'"core": "[a-z ]{1,16}", "length": [0-9]{1,2}\}, "alive": (true|false)\}')


class City(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")  # additionalProperties: false, or the model may add keys

    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)
    is_capital: bool


@sgl.function
def few_shot_qa(s, question):
    s += "The following are questions with answers.\n\n"
    s += "Q: What is the capital of France?\nA: Paris\n"
    s += "Q: What is the capital of Germany?\nA: Berlin\n"
    s += "Q: What is the capital of Italy?\nA: Rome\n"
    with s.var_scope("qa"):
        s += "Q: " + question + "\n"
        s += "A:" + sgl.gen("answer", stop="\n", max_tokens=8)



@sgl.function
def two_turns(s, question_1, question_2):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question_1)
    s += sgl.assistant(sgl.gen("answer_1", max_tokens=16))
    with s.user():
        s += question_2
    with s.assistant():
        s += sgl.gen("answer_2", max_tokens=16)



@sgl.function
def capital(s, choices, choices_method):
    s += "Q: What is the capital of Germany?\nA: Berlin\n"
    s += "Q: What is the capital of France?\nA: "
    s += sgl.select("city", choices, choices_method=choices_method)



@sgl.function
def boundary(s):
    s += "The capital of France is " + sgl.select("city", ["Paris", "London"])



def calculate(expression: str) -> str:
    return str(eval(expression, {"__builtins__": {}}))  # the model's text, evaluated as arithmetic only



@sgl.function
def tool_use(s, lhs, rhs):
    s += "Please perform computations using a calculator. You can use calculate(expression) to get the results.\n"
    s += "For example,\ncalculate(1+2)=3\ncalculate(3*4)=12\n"
    s += f"Question: What is the product of {lhs} and {rhs}?\n"
    s += "Answer: The answer is calculate(" + sgl.gen("expression", stop=")", max_tokens=16) + ") = "
    with s.var_scope("answer"):
        s += calculate(s["expression"])



@sgl.function
def react(s, question, max_steps=3):
    s += REACT_EXAMPLE + "Question: " + question + "\n"
    for i in range(1, max_steps + 1):
        s += f"Thought {i}:" + sgl.gen(stop=[".", "\n"], max_tokens=20) + ".\n"
        s += f"Action {i}: " + sgl.select(f"action_{i}", ["Search", "Finish"])
        if s[f"action_{i}"] == "Search":
            s += " [" + sgl.gen(f"query_{i}", stop="]", max_tokens=12) + "].\n"
            s += f"Observation {i}:" + sgl.gen(stop=[".", "\n"], max_tokens=20) + ".\n"
        else:
            s += " [" + sgl.gen("answer", stop="]", max_tokens=12) + "].\n"
            return i
    return None



@sgl.function
def skeleton_of_thought(s, topic, n):
    s += f"Act as a helpful assistant.\nUSER: Give some tips for {topic}.\n"
    s += f"ASSISTANT: Okay. Here are {n} concise tips:\n1. Plan ahead\n2. Stay focused\n3. Rest well\n"
    forks = s.fork(n)
    forks += lambda i: f"Now, I expand tip {i + 1} into a detailed paragraph:\nTip {i + 1}:" + sgl.gen(
        "detail", max_tokens=16, stop="\n\n")
    forks.join()
    s += "Here are these tips with detailed explanation:\n"
    for i, detail in enumerate(s["detail"]):
        s += f"Tip {i + 1}:{detail}\n"
    s += "\nIn summary," + sgl.gen("summary", max_tokens=16, stop="\n")
    return [f.get_meta_info("detail")["cached_tokens"] for f in forks]



@sgl.function
def qa(s, question):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=16))



@sgl.function
def count(s, question):
    s += sgl.user(question)
    # The fixed words are forced (jump-forward); only the number is the model's choice.
    s += sgl.assistant(sgl.gen("answer", regex=r"The answer is [0-9]+\.", max_tokens=16))



@sgl.function
def typed(s):
    s += "Pick a number: " + sgl.gen_int("n", max_tokens=6) + "\n"
    s += "Pick a boolean: " + sgl.gen("b", dtype=bool) + "\n"
    s += "Name a fruit in quotes: " + sgl.gen_string("fruit", max_tokens=12)



@sgl.function
def character(s, name):
    s += name + " is a character in Harry Potter. Please fill in the following information about this character.\n"
    s += sgl.gen("json_output", max_tokens=128, regex=CHARACTER_REGEX)



@sgl.function
def city(s, text):
    s += sgl.user("Extract the city described below as JSON.\n" + text)
    s += sgl.assistant(sgl.gen("city", json_schema=City, max_tokens=64))
