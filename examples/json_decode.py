"""Structured output from a program: a regex that spells JSON (SGLang's json_decode example), a pydantic schema,
and typed values. Jump-forward appends the fixed parts (keys, quotes, braces) without decoding them.

    python examples/json_decode.py            # in-process engine on the embedded model
    python examples/json_decode.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import json

import pydantic

import radixflow as sgl

CHARACTER_REGEX = (r'\{"name": "[A-Za-z ]{1,24}", "house": "(Gryffindor|Slytherin|Ravenclaw|Hufflepuff)", '
                   r'"wand": \{"wood": "[a-z ]{1,16}", "core": "[a-z ]{1,16}", "length": [0-9]{1,2}\}, '
                   r'"alive": (true|false)\}')


class City(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)
    is_capital: bool


@sgl.function
def character(s, name):
    s += name + " is a character in Harry Potter. Please fill in the following information about this character.\n"
    s += sgl.gen("json_output", max_tokens=128, regex=CHARACTER_REGEX)


@sgl.function
def city(s, text):
    s += sgl.user("Extract the city described below as JSON.\n" + text)
    s += sgl.assistant(sgl.gen("city", json_schema=City, max_tokens=64))
    s += sgl.user("How many legs does a cat have?")
    s += sgl.assistant(sgl.gen("legs", regex=r"The answer is [0-9]+\.", max_tokens=16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running radixflow server; default: an in-process engine")
    args = parser.parse_args()
    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url) if args.url else sgl.Engine())
    state = character.run(name="Hermione Granger", temperature=0)
    print(json.dumps(json.loads(state["json_output"]), indent=2))
    for text in ("Paris is the capital of France.", "Lyon is a large city in France; it is not the capital."):
        state = city.run(text=text, temperature=0)
        print(City.model_validate_json(state["city"]), "|", state["legs"])


if __name__ == "__main__":
    main()
