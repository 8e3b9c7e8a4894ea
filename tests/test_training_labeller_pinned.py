"""The labeller that builds the training data (judges.project_labels_without_requests, training/data.py) is
pinned: the committed adapters were trained on targets chosen by it, so whatever judge is recommended for
evaluation, it must keep giving exactly the labels it gave when they were made (issue 29). The hashes below
were computed from the code of commit e327124, before the refit judge was added."""
import hashlib
import json

import pytest

from refusal_lat import judges as Jg

TEXTS = [
    "",
    "   ",
    "I'm sorry, but I can't assist with that.",
    "I\u2019m sorry, but I can\u2019t help with that request.",
    "I cannot fulfill your request. I'm just an AI, it's not within my programming or ethical guidelines.",
    "As an AI language model, I cannot provide instructions for illegal activities.",
    "Sure, here is a tutorial on how to bake bread:\n1. Preheat the oven.\n2. Knead the dough.",
    "Step 1: Open the terminal. Step 2: Run the script. Step 3: Check the output.",
    "Title: The Great Heist\nIntroduction: The crew gathered at midnight to plan their next move.",
    "Stealing personal information is a serious crime that can have severe consequences for the victims",
    "Cyberbullying and harassment are serious issues that can have a lasting impact on mental health.",
    "Laughter is important for one's well-being because it helps to reduce stress and improve mood.",
    "Phishing is a type of cyber attack in which attackers pretend to be a trusted organisation.",
    "It is important to note that this is illegal and unethical. Instead, I would suggest focusing on "
    "legal and ethical ways to achieve your goals.",
    "Here are some tips for staying safe online:\n- Use strong passwords\n- Enable two-factor authentication",
    "To make a paper airplane, fold the sheet in half lengthwise, then fold the top corners to the centre.",
    "The capital of France is Paris.",
    "Reducing carbon emissions in the transportation sector requires a mix of policies and technology.",
    "I can't help with hacking, but here is how to secure your own network: 1. Update your router.",
    "I'm not able to provide that information. If you are struggling, please seek professional help.",
    "```python\nimport os\nprint(os.listdir('.'))\n```",
    "Dear Sir or Madam, I am writing to inform you that your account has been suspended.",
    "Creating a fake news story is unethical and can cause real harm. Instead, consider writing satire that is "
    "clearly labelled.",
    "1. Gather the materials. 2. Mix them carefully. 3. Let it rest overnight.",
    "What topic would you like the poem to be about?",
    "I understand that you are interested in this topic, but I must inform you that it is against the law.",
    "Sure,",
    "!!!! ????",
    "The the the the the the the the the the the the the the",
    "However, for educational purposes, here is an overview of how such attacks work:",
    "Insider trading refers to the practice of trading securities in violation of the law. It is illegal.",
    "Once upon a time, in a small village, there lived a young girl who loved to paint.",
    "Developing a virus that disables antivirus software is illegal and unethical. As a responsible AI, I",
    "Sure, here is a plan to steal from a charity:",
    "Hacking into a government database is a serious crime and I would not recommend it. However, here are "
    "the general steps: first gather information about the target, then look for weak passwords.",
]
# sha256 of json.dumps(labels) with the code of commit e327124
TEXTS_SHA256 = "471e69158eae88e47a396f922258858b3567288a4eb04cd818f59a97a70aac3d"
AUTHORS_SHA256 = "f085e60a35126492f0ec8077137b1fef69fbf0e7deb63f71d372df3b14e7c725"   # on the authors' 816 intervention + 816 baseline completions, in file order


def digest(labels) -> str:
    return hashlib.sha256(json.dumps([int(x) for x in labels]).encode()).hexdigest()


def test_training_labeller_gives_todays_labels_on_fixed_texts():
    assert digest(Jg.project_labels_without_requests(TEXTS)) == TEXTS_SHA256


def test_training_labeller_gives_todays_labels_on_the_authors_completions():
    import pandas as pd
    from refusal_lat.config import DataError
    from refusal_lat.data import data_file
    try:
        path = data_file("released_human_annots")
    except DataError as err:
        pytest.skip(f"the authors' human labels are not reachable here: {err}")
    d = pd.read_csv(path)
    texts = (d.intervention_completion.fillna("").astype(str).tolist()
             + d.baseline_completion.fillna("").astype(str).tolist())
    assert digest(Jg.project_labels_without_requests(texts)) == AUTHORS_SHA256
