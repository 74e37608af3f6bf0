"""A deterministic, caption-like English corpus: what the tiny T5 tokenizer is trained on.

No T5 vocabulary ships with any installed package and nothing may be downloaded, so the tiny
set's T5 tokenizer is a SentencePiece model trained on captions generated here from word lists
(objects, colours, styles, numbers, ...) in the phrasings text-to-image prompts use.
"""

from __future__ import annotations

import random


def _words(text: str) -> list[str]:
    return text.split()


def _phrases(text: str) -> list[str]:
    """Split on newlines and "|" (phrases contain spaces)."""
    return [p.strip() for p in text.replace("\n", "|").split("|") if p.strip()]


_OBJECTS = _words(
    """
cat dog horse bird cow sheep goat pig chicken duck car bus truck bicycle boat airplane train
house tree flower mountain river lake ocean beach bridge castle tower church chair table lamp
book cup bottle apple banana orange cake pizza sandwich clock phone computer guitar piano violin
drum trumpet robot astronaut dragon unicorn fox wolf bear lion tiger elephant giraffe zebra
rabbit squirrel mouse owl eagle parrot fish turtle frog butterfly bee spider snake penguin
dolphin whale shark crab octopus girl boy woman man child baby teacher doctor soldier knight
wizard princess king queen chef farmer sailor pilot skateboard umbrella kite balloon candle
window door street road city village forest desert island garden park field sky cloud sun moon
star planet rainbow storm snowman waterfall volcano cave lighthouse windmill tractor motorcycle
helicopter submarine rocket satellite telescope microscope camera television radio keyboard
backpack suitcase hat shoe glove scarf dress jacket necklace ring crown sword shield helmet
basket bucket ladder hammer bench fence gate staircase fountain statue temple pyramid palace
cottage barn tent hospital school library restaurant bakery market station airport harbor
stadium theater office kitchen bedroom bathroom garage mushroom cactus pumpkin carrot tomato
potato strawberry cherry lemon grape watermelon coffee tea bread cheese soup noodle cookie donut
chocolate honey leaf branch rock pebble feather shell crystal diamond pearl coin map letter
envelope newspaper painting photograph mirror pillow blanket carpet vase teapot spoon fork knife
plate bowl jar monkey panda koala kangaroo camel deer moose raccoon hedgehog beaver otter seal
flamingo peacock swan pelican hummingbird jellyfish starfish lobster snail ladybug dinosaur
mermaid ghost vampire pirate ninja samurai viking cowboy detective scientist musician dancer
painter gardener fisherman firefighter nurse student grandmother grandfather sister brother
"""
)
_PLURAL_EXCEPTIONS = {
    "mouse": "mice",
    "man": "men",
    "woman": "women",
    "child": "children",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
    "moose": "moose",
    "knife": "knives",
    "leaf": "leaves",
    "wolf": "wolves",
    "shelf": "shelves",
    "potato": "potatoes",
    "tomato": "tomatoes",
    "volcano": "volcanoes",
    "fisherman": "fishermen",
    "snowman": "snowmen",
}
_COLOURS = _words(
    """
red green blue yellow orange purple pink brown black white gray golden silver beige turquoise
violet crimson navy teal maroon lavender emerald scarlet ivory amber magenta olive cyan bronze
"""
)
_ADJECTIVES = _words(
    """
small large tiny huge old young happy sad cute fluffy shiny wooden metal glass stone ancient
modern beautiful dark bright quiet busy sleepy wet dry rusty frozen glowing broken painted
striped spotted curly tall short narrow wide heavy light warm cold calm angry curious brave
lonely elegant colorful foggy misty sunny cloudy dusty muddy giant friendly mysterious magical
abandoned crowded empty cozy detailed realistic surreal minimalist futuristic medieval
"""
)
_VERBS = _words(
    """
sitting standing running jumping sleeping flying swimming walking eating reading playing
looking waiting dancing climbing holding carrying driving riding singing laughing smiling
painting cooking fishing hiding resting floating writing drinking watching building exploring
"""
)
_PLACES = _phrases(
    """
in a forest|on a beach|in the city|at night|under the rain|in the snow|on a table|in a kitchen
in a garden|on the moon|in space|on a mountain|by the river|in a museum|on a street|in a field
at sunset|at sunrise|in the desert|underwater|in a library|on a rooftop|in a park|at the market
in a small village|inside a cave|next to a lake|on a boat|in a classroom|at the station
"""
)
_STYLES = _phrases(
    """
oil painting|watercolor|pencil sketch|digital art|photograph|3d render|anime illustration
pixel art|charcoal drawing|studio photo|vintage poster|low poly model|comic book panel
macro photograph|long exposure photo|black and white photo|impressionist painting|concept art
children's book illustration|cinematic still|ink drawing|mosaic|stained glass window|sculpture
"""
)
_NUMBERS = _words(
    """
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty thirty forty fifty hundred
"""
)
_LIGHT = _phrases(
    """
soft light|dramatic lighting|golden hour|neon lights|overcast sky|candlelight|studio lighting
backlit|harsh shadows|volumetric fog|bokeh background|shallow depth of field|wide angle lens
"""
)


def _plural(word: str) -> str:
    if word in _PLURAL_EXCEPTIONS:
        return _PLURAL_EXCEPTIONS[word]
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_corpus(n: int = 6000) -> list[str]:
    """A deterministic, caption-like English corpus (independent of the weight seed)."""
    r = random.Random(20240612)
    out = []
    for i in range(n):
        o, o2 = r.choice(_OBJECTS), r.choice(_OBJECTS)
        c, a, v = r.choice(_COLOURS), r.choice(_ADJECTIVES), r.choice(_VERBS)
        p, s, num, li = r.choice(_PLACES), r.choice(_STYLES), r.choice(_NUMBERS), r.choice(_LIGHT)
        k = i % 10
        if k == 0:
            out.append(f"a photo of {_article(c)} {c} {o} {p}")
        elif k == 1:
            out.append(f"a handwritten digit {r.choice(_NUMBERS[:10])}")
        elif k == 2:
            out.append(f"{s} of {_article(a)} {a} {o} {v} {p}, {c} tones")
        elif k == 3:
            out.append(f"{num} {_plural(o)} and {_article(c)} {c} {o2} {p}")
        elif k == 4:
            subject = f"{_article(a).capitalize()} {a} {o} {v} next to {_article(o2)} {o2}"
            out.append(f"{subject}. {s.capitalize()}, {li}.")
        elif k == 5:
            out.append(f"close-up of the {c} {o}'s face, {s}, {li}")
        elif k == 6:
            out.append(f"an image showing {_article(a)} {a}, {c} {o} {p} with {num} {_plural(o2)}")
        elif k == 7:
            out.append(f"the number {r.randint(0, 100)} painted on a {c} wall; {s}")
        elif k == 8:
            out.append(f"{_plural(o).capitalize()} {v} {p} in {r.randint(1900, 2024)}, {li}")
        else:
            out.append(f"a {s} of {num} {a} {_plural(o2)}, trending, highly detailed, 4k")
    return out
