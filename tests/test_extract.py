import pytest

from cwt_ray.extract import get_extractor, parse_number

EX = get_extractor("number", "#### {answer}")


@pytest.mark.parametrize("text, answer, formatted", [
    ("She has 5 apples.\n#### 72", "72", True),
    ("#### 1,234", "1234", True),
    ("#### $5.50", "5.5", True),
    ("#### -3", "-3", True),
    ("#### 0.25", "0.25", True),
    ("#### .5", "0.5", True),
    ("#### 18 dollars", "18", True),
    ("#### 72.", "72", True),
    ("so 3 + 4 = 7. The answer is 7.", "7", False),
    ("The answer is: $1,000", "1000", False),
    ("first 3 then 12 = 12", "12", False),
    ("no number here", None, False),
    ("#### 72\nand later #### 5", "72", True),
    ("3.5 hours then 2.5 more makes 6", "6", False),
])
def test_number_extraction(text, answer, formatted):
    got = EX.extract(text)
    assert got.answer == answer
    assert got.formatted == formatted


def test_gold_normalisation_and_correctness():
    assert EX.normalize_gold("72.0") == "72"
    assert EX.normalize_gold("$1,200") == "1200"
    assert EX.normalize_gold("n/a") is None
    assert EX.is_correct("72", "72") and not EX.is_correct(None, "72") and not EX.is_correct("71", "72")


def test_contains_answer_sees_numbers_not_digits():
    assert EX.contains("total is 1,234 apples", "1234")
    assert not EX.contains("total is 11234", "1234")
    assert EX.contains("she paid $5.50", "5.5")


def test_parse_number_edge_cases():
    assert str(parse_number("-7 degrees")) == "-7"
    assert parse_number("abc") is None


YN = get_extractor("yes_no", "#### {answer}")


@pytest.mark.parametrize("text, answer, formatted", [
    ("Birds can fly.\n#### Yes", "yes", True),
    ("#### **no**", "no", True),
    ("#### True.", "yes", True),
    ("The answer is no, because fish cannot walk.", "no", False),
    ("Yesterday it rained, so no.", "no", False),          # 'Yesterday' is not 'yes'
    ("It is not known", None, False),
    ("#### maybe\nyes", "yes", False),                      # formatted line unreadable: fall back
])
def test_yes_no_extraction(text, answer, formatted):
    got = YN.extract(text)
    assert (got.answer, got.formatted) == (answer, formatted)


def test_yes_no_gold_and_contains():
    assert YN.normalize_gold("Yes") == "yes" and YN.normalize_gold("false") == "no"
    assert YN.normalize_gold("perhaps") is None and YN.normalize_gold("no way") is None
    assert YN.contains("so the answer: NO", "no") and not YN.contains("nothing here", "no")


MC = get_extractor("choice", "#### {answer}")


@pytest.mark.parametrize("text, answer, formatted", [
    ("Apples are red.\n#### (B)", "B", True),
    ("#### c", "C", True),
    ("#### D) 42 apples", "D", True),
    ("The answer is (E).", "E", False),
    ("A farmer has (A) 3 or (B) 4 cows; it is (B) 4", "B", False),   # last marked letter, not 'A farmer'
    ("A farmer has cows.", None, False),
])
def test_choice_extraction(text, answer, formatted):
    got = MC.extract(text)
    assert (got.answer, got.formatted) == (answer, formatted)


def test_choice_gold():
    assert [MC.normalize_gold(g) for g in ("b", "(C)", "D)", "A.", "AB", "7")] == ["B", "C", "D", "A", None, None]
    assert MC.contains("pick (c) then", "C") and not MC.contains("A cat", "A")


EX_STR = get_extractor("exact", "#### {answer}")


@pytest.mark.parametrize("text, answer, formatted", [
    ("Last letters: n, k.\n#### NK.", "nk", True),
    ("The answer is  New   York!\nmore", "new york", False),
    ("line one\n  Final Line  ", "final line", False),
    ("", None, False),
])
def test_exact_extraction(text, answer, formatted):
    got = EX_STR.extract(text)
    assert (got.answer, got.formatted) == (answer, formatted)
    assert EX_STR.is_correct(got.answer, EX_STR.normalize_gold(answer or "x")) == (answer is not None)


# What a rationale *states*: the answer format or an explicit phrase, never the fallbacks (a stray
# yes/no word, the last number, a choice mark in passing), which the agreement filter must not judge.
@pytest.mark.parametrize("answer_type, text, stated", [
    # yes/no: human-written facts full of incidental "no" and "true"
    ("yes_no", "There is no evidence that Lincoln met Darwin. Both were born on 12 February 1809.", None),
    ("yes_no", "No penguin species lives in the Arctic; it is true that they live south of the equator.", None),
    ("yes_no", "Penguins live only in the Southern Hemisphere. So the answer is no.", "no"),
    ("yes_no", "Sharks are fish, not mammals. The answer: Yes", "yes"),     # a wrong one is still stated
    ("yes_no", "Cats sleep 13 hours a day.\n#### **yes**", "yes"),
    ("yes_no", "CATS SLEEP A LOT. THE ANSWER IS YES.", "yes"),
    ("yes_no", "He answered: yes, politely.", None),                         # 'answered' is not 'answer'
    ("yes_no", "The answer isn't obvious: no records survive.", None),
    ("yes_no", "We need the answer:\nno records survive.", None),           # 'answer:' ends its line
    # numbers: an incidental number is not a stated answer
    ("number", "The Eiffel Tower is 330 metres tall and was finished in 1889.", None),
    ("number", "3 boxes of 4 pens make 12 pens.\n#### 12", "12"),
    ("number", "She had 5 apples and ate 2, so the answer is 3 apples.", "3"),
    ("number", "She had 5 apples and ate 2. The Answer: $1,003.50", "1003.5"),
    # choices: a letter in passing is not the answer
    ("choice", "A whale is a mammal, as (C) and (D) say of dolphins.", None),
    ("choice", "Whales breathe air. The answer is (B).", "B"),
    ("choice", "Whales breathe air.\n#### d) lungs", "D"),
])
def test_stated_counts_only_the_answer_format_and_explicit_phrases(answer_type, text, stated):
    ex = get_extractor(answer_type, "#### {answer}")
    assert ex.stated(text).answer == stated
    if stated is not None:   # extract agrees with stated wherever something is stated
        assert ex.extract(text) == ex.stated(text)


def test_extract_still_falls_back_where_nothing_is_stated():
    """Scoring a student's output keeps its fallbacks: the last yes/no word, number, or mark."""
    assert YN.extract("There is no evidence, so yes").answer == "yes"
    assert EX.extract("330 metres, finished in 1889").answer == "1889"
    assert MC.extract("as (C) and (D) say").answer == "D"
    assert EX_STR.extract("line one\nnkyu").answer == "nkyu" and EX_STR.stated("line one\nnkyu").answer is None
