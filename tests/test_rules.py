"""Escalation rules: parsing into an AST, matching messages, explanations and every kind of syntax error."""

from __future__ import annotations

import pickle
import re

import pytest

from konstruct.agent.rules import (
    MAX_DEPTH,
    MAX_LENGTH,
    And,
    Count,
    Explanation,
    Keyword,
    Not,
    Or,
    Rule,
    RuleError,
    first_match,
    parse,
)

a, b, c = Keyword("a"), Keyword("b"), Keyword("c")


def fires(rule: str, message: str, count: int = 1) -> bool:
    return parse(rule).matches(message, count)


# --- parsing: structure and precedence -----------------------------------------------------------


def test_the_ast_of_a_typical_rule() -> None:
    rule = parse("billing AND count > 2")
    assert rule == Rule("billing AND count > 2", And((Keyword("billing"), Count(">", 2))))


def test_not_binds_tighter_than_and_which_binds_tighter_than_or() -> None:
    assert parse("a OR b AND c").node == Or((a, And((b, c))))
    assert parse("a AND b OR c").node == Or((And((a, b)), c))
    assert parse("NOT a AND b").node == And((Not(a), b))
    assert parse("NOT a OR b AND NOT c").node == Or((Not(a), And((b, Not(c)))))


def test_chains_of_one_operator_are_flat() -> None:
    assert parse("a AND b AND c").node == And((a, b, c))
    assert parse("a OR b OR c").node == Or((a, b, c))


def test_parentheses_override_precedence() -> None:
    assert parse("(a OR b) AND c").node == And((Or((a, b)), c))
    assert parse("NOT (a OR b)").node == Not(Or((a, b)))
    assert parse("((a))").node == a
    assert parse("(a)AND(b)").node == And((a, b))


def test_precedence_decides_matching() -> None:
    assert fires("a OR b AND c", "a")
    assert not fires("(a OR b) AND c", "a")
    assert fires("NOT a AND b", "b")
    assert not fires("NOT (a AND b) AND b", "a b")
    assert fires("NOT NOT a", "a")


def test_operators_are_case_insensitive() -> None:
    assert parse("a and b Or not c").node == Or((And((a, b)), Not(c)))


def test_the_example_from_the_operators_guide() -> None:
    rule = parse('NOT (price OR "money back") AND count >= 3')
    assert rule.node == And((Not(Or((Keyword("price"), Keyword("money back")))), Count(">=", 3)))
    assert rule.matches("I still cannot log in", 3)
    assert not rule.matches("I still cannot log in", 2)
    assert not rule.matches("What is the price?", 5)
    assert not rule.matches("I want my money  back", 5)


def test_keywords_compile_their_pattern_when_parsed() -> None:
    node = parse("billing").node
    assert isinstance(node, Keyword)
    assert isinstance(node.pattern, re.Pattern)


def test_quoted_reserved_words_are_keywords() -> None:
    assert parse('"count" AND "and" OR "NOT"').node == Or((And((Keyword("count"), Keyword("and"))), Keyword("NOT")))
    assert fires('"count"', "please count again")


def test_words_containing_reserved_words_are_keywords() -> None:
    assert parse("counts OR android OR notary OR order").node == Or(
        (Keyword("counts"), Keyword("android"), Keyword("notary"), Keyword("order"))
    )


def test_phrases_are_stripped_and_curly_quotes_work() -> None:
    assert parse('"  money back "').node == Keyword("money back")
    assert parse("“money back”").node == Keyword("money back")


def test_whitespace_of_any_kind_separates_tokens() -> None:
    assert parse("\ta\nAND\u00a0b  ").node == And((a, b))


# --- keyword matching ----------------------------------------------------------------------------


def test_keywords_match_in_any_case() -> None:
    assert fires("billing", "BILLING problem")
    assert fires("BiLLiNg", "my billing")
    assert fires("Rückerstattung", "RÜCKERSTATTUNG bitte")
    assert fires("straße", "STRASSE")


def test_keywords_match_whole_words_only() -> None:
    assert not fires("bill", "billing")
    assert not fires("bill", "rebill")
    assert fires("bill", "my bill, please")
    assert fires("bill", "bill")
    assert fires("bill", "(bill)")
    assert fires("refund", "refund's status")
    assert not fires("404", "error 4040")


def test_unicode_letters_count_as_word_characters() -> None:
    assert fires("Rückerstattung", "Ich möchte eine Rückerstattung.")
    assert not fires("Rück", "Ich möchte eine Rückerstattung.")
    assert not fires("erstattung", "Rückerstattung")
    assert fires("café", "un café?")
    assert not fires("caf", "café")
    assert fires("возврат", "Нужен ВОЗВРАТ денег")


def test_decomposed_unicode_matches_composed() -> None:
    assert fires("Rückerstattung", "Ru\u0308ckerstattung")
    assert fires("Ru\u0308ckerstattung", "Rückerstattung")


def test_apostrophes_and_hyphens_are_part_of_bare_words() -> None:
    assert parse("don't AND e-mail").node == And((Keyword("don't"), Keyword("e-mail")))
    assert fires("don't", "I DON'T know")
    assert fires("don't", "I don’t know")
    assert fires("don’t", "I don't know")
    assert fires("e-mail", "my e-mail bounced")
    assert not fires("e-mail", "my email bounced")


def test_phrases_match_as_whole_words_with_any_whitespace_between() -> None:
    assert fires('"money back"', "I want my money back!")
    assert fires('"money back"', "MONEY\n\t back")
    assert not fires('"money back"', "moneyback")
    assert not fires('"money back"', "money backing")
    assert not fires('"money back"', "easymoney back")
    assert not fires('"money back"', "money, back")


def test_phrases_with_symbols_match_literally() -> None:
    assert fires('"$100"', "it cost $100.")
    assert not fires('"a.b"', "axb")
    assert fires('"(urgent)"', "re: (urgent) help")


def test_empty_message() -> None:
    assert not fires("billing", "")
    assert fires("NOT billing", "")


# --- count ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "below", "equal", "above"),
    [
        (">", False, False, True),
        (">=", False, True, True),
        ("<", True, False, False),
        ("<=", True, True, False),
        ("=", False, True, False),
        ("==", False, True, False),
        ("!=", True, False, True),
    ],
)
def test_every_comparison_operator(op: str, below: bool, equal: bool, above: bool) -> None:
    rule = parse(f"count {op} 3")
    assert rule.node == Count(op, 3)
    assert [rule.matches("", n) for n in (2, 3, 4)] == [below, equal, above]


def test_comparison_spacing_and_case() -> None:
    assert parse("count>=10").node == Count(">=", 10)
    assert parse("COUNT != 007").node == Count("!=", 7)


def test_count_node_rejects_an_unknown_operator() -> None:
    with pytest.raises(ValueError, match="unknown operator"):
        Count("=>", 1)


# --- explanations --------------------------------------------------------------------------------


def test_explain_lists_every_term_that_made_an_and_true() -> None:
    assert parse("billing AND count > 2").explain("Billing question", 3) == Explanation(True, ['"billing" found', "count 3 > 2"])


def test_explain_names_the_first_term_that_made_an_and_false() -> None:
    assert parse("billing AND count > 2").explain("hello", 3) == Explanation(False, ['"billing" not found'])
    assert parse("billing AND count > 2").explain("billing", 1) == Explanation(False, ["count 1 <= 2"])


def test_explain_names_the_first_term_that_made_an_or_true() -> None:
    assert parse("refund OR lawyer").explain("my lawyer and a refund", 1) == Explanation(True, ['"refund" found'])
    assert parse("refund OR lawyer").explain("my lawyer", 1) == Explanation(True, ['"lawyer" found'])


def test_explain_lists_every_term_that_made_an_or_false() -> None:
    assert parse("refund OR lawyer").explain("hi", 1) == Explanation(False, ['"refund" not found', '"lawyer" not found'])


def test_explain_through_not_and_nesting() -> None:
    rule = parse('NOT (price OR "money back") AND count >= 3')
    assert rule.explain("hello", 3) == Explanation(True, ['"price" not found', '"money back" not found', "count 3 >= 3"])
    assert rule.explain("Money back now", 9) == Explanation(False, ['"money back" found'])


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ("count > 5", "count 1 <= 5"),
        ("count >= 5", "count 1 < 5"),
        ("count < 0", "count 1 >= 0"),
        ("count <= 0", "count 1 > 0"),
        ("count = 5", "count 1 != 5"),
        ("count == 5", "count 1 != 5"),
        ("count != 1", "count 1 = 1"),
    ],
)
def test_a_failed_comparison_is_explained_with_the_relation_that_holds(rule: str, reason: str) -> None:
    assert parse(rule).explain("", 1) == Explanation(False, [reason])


def test_explain_keeps_the_keyword_as_written_and_drops_repeats() -> None:
    assert parse('Rückerstattung AND rückerstattung AND "Money  back"').explain("rückerstattung, money back", 1) == Explanation(
        True, ['"Rückerstattung" found', '"rückerstattung" found', '"Money  back" found']
    )
    assert parse("a AND a").explain("a", 1) == Explanation(True, ['"a" found'])


def test_explain_agrees_with_matches() -> None:
    rules = ["a OR b AND NOT c", "NOT (a AND b) OR count = 2", "(a OR b) AND (c OR count > 3)", "NOT NOT a"]
    for text in rules:
        rule = parse(text)
        for message in ("", "a", "b", "c", "a b", "a c", "b c", "a b c"):
            for count in (1, 2, 4):
                assert rule.explain(message, count).fired is rule.matches(message, count)


# --- first_match ---------------------------------------------------------------------------------


def test_first_match_returns_the_first_rule_that_fires_and_why() -> None:
    rules = [parse("lawyer"), parse("billing AND count > 2"), parse("billing")]
    assert first_match(rules, "billing again", 3) == (rules[1], Explanation(True, ['"billing" found', "count 3 > 2"]))
    assert first_match(rules, "billing again", 1) == (rules[2], Explanation(True, ['"billing" found']))


def test_first_match_is_none_when_nothing_fires() -> None:
    assert first_match([parse("lawyer"), parse("count > 5")], "hello", 1) is None
    assert first_match([], "hello", 1) is None


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message", "position"),
    [
        # empty
        ("", "empty rule", 0),
        ("   \n", "empty rule", 0),
        # unbalanced parentheses
        ("(billing", "unclosed '('", 0),
        ("(a OR (b", "unclosed '('", 6),
        ("((a)", "unclosed '('", 0),
        ("billing)", "unmatched ')'", 7),
        (")", "unmatched ')'", 0),
        ("a OR b) AND (c", "unmatched ')'", 6),
        ("()", "empty parentheses", 0),
        ("a AND ()", "empty parentheses", 6),
        ("(a b)", "expected AND, OR or ')', found 'b'", 3),
        # dangling or misplaced operators
        ("billing AND", "expected a keyword or '(' after AND, found end of rule", 11),
        ("billing or ", "expected a keyword or '(' after OR, found end of rule", 11),
        ("NOT", "expected a keyword or '(' after NOT, found end of rule", 3),
        ("AND billing", "expected a keyword or '(', found 'AND'", 0),
        ("a AND OR b", "expected a keyword or '(' after AND, found 'OR'", 6),
        ("(a AND) OR b", "expected a keyword or '(' after AND, found ')'", 6),
        ("billing refund", "expected AND, OR or end of rule, found 'refund'", 8),
        ("billing NOT refund", "expected AND or OR before NOT", 8),
        ('a "b c"', "expected AND, OR or end of rule, found '\"b c\"'", 2),
        # bad comparisons
        (
            "count",
            'expected a comparison operator (> >= < <= = == !=) after count, found end of rule (to match the word, quote it: "count")',
            5,
        ),
        (
            "count AND x",
            "expected a comparison operator (> >= < <= = == !=) after count, found 'AND' (to match the word, quote it: \"count\")",
            6,
        ),
        ("count 3", "expected a comparison operator (> >= < <= = == !=) after count, found '3'", 6),
        ("count >", "expected a whole number after '>', found end of rule", 7),
        ("count > two", "expected a whole number after '>', found 'two'", 8),
        ("count >= 2.5", "expected a whole number after '>=', found '2.5'", 9),
        ("count > -1", "expected a whole number after '>', found '-1'", 8),
        ("count < (3)", "expected a whole number after '<', found '('", 8),
        ("count => 3", "unknown operator '=>' (use one of > >= < <= = == !=)", 6),
        ("count <> 3", "unknown operator '<>' (use one of > >= < <= = == !=)", 6),
        ("count === 3", "unknown operator '===' (use one of > >= < <= = == !=)", 6),
        ("count ! 3", "unknown operator '!' (use one of > >= < <= = == !=)", 6),
        ("billing > 2", "expected AND, OR or end of rule, found '>' (only count can be compared)", 8),
        ("a AND = 2", "expected a keyword or '(' after AND, found '=' (only count can be compared)", 6),
        # quotes
        ('a OR "money back', "unterminated quote", 5),
        ('"', "unterminated quote", 0),
        ('a AND ""', "empty phrase", 6),
        ('" "', "empty phrase", 0),
        # stray characters
        ("billing & refund", "unexpected character '&' (use AND)", 8),
        ("billing || refund", "unexpected character '|' (use OR)", 8),
        ("billing, refund", "unexpected character ','", 7),
        ("a AND b;", "unexpected character ';'", 7),
        ("order_id", "unexpected character '_'", 5),
        ("__import__('os')", "unexpected character '_'", 0),
        ("!refund", "expected a keyword or '(', found '!' (use NOT)", 0),
        ("-refund", "a keyword cannot start with '-' (use NOT to exclude a word)", 0),
        ("a OR '", 'a keyword needs a letter or digit, found "\'"', 5),
    ],
)
def test_syntax_errors_say_what_and_where(text: str, message: str, position: int) -> None:
    with pytest.raises(RuleError) as caught:
        parse(text)
    assert (caught.value.message, caught.value.position) == (message, position)


def test_the_first_error_from_the_left_is_reported() -> None:
    with pytest.raises(RuleError) as caught:
        parse('a b & "unterminated')
    assert (caught.value.message, caught.value.position) == ("expected AND, OR or end of rule, found 'b'", 2)


def test_rule_error_is_a_value_error_with_a_readable_message() -> None:
    with pytest.raises(ValueError) as caught:
        parse("billing AND")
    assert str(caught.value) == "expected a keyword or '(' after AND, found end of rule at position 11: billing AND"
    assert isinstance(caught.value, RuleError)
    assert caught.value.text == "billing AND"


def test_rule_error_message_without_text() -> None:
    with pytest.raises(RuleError) as caught:
        parse("  ")
    assert str(caught.value) == "empty rule at position 0"


def test_rule_error_message_shows_a_one_line_excerpt_of_long_rules() -> None:
    text = "a AND " * 20 + "& b"
    with pytest.raises(RuleError) as caught:
        parse(text)
    assert caught.value.position == 120
    assert str(caught.value) == "unexpected character '&' (use AND) at position 120: …" + text[-60:]
    with pytest.raises(RuleError) as caught:
        parse("a\nAND")
    assert str(caught.value).endswith(": a AND")


def test_rule_error_survives_pickling() -> None:
    with pytest.raises(RuleError) as caught:
        parse("count >")
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.message, copy.position, copy.text, str(copy)) == (
        caught.value.message,
        caught.value.position,
        caught.value.text,
        str(caught.value),
    )


# --- limits --------------------------------------------------------------------------------------


def test_rule_length_limit() -> None:
    longest = "word OR " * 124 + "lastword"
    assert len(parse(longest).text) == MAX_LENGTH
    with pytest.raises(RuleError) as caught:
        parse("a" * (MAX_LENGTH + 1))
    assert caught.value.message == f"rule is too long ({MAX_LENGTH + 1} characters, at most {MAX_LENGTH})"
    assert caught.value.position == MAX_LENGTH


def test_nesting_up_to_the_limit_parses() -> None:
    assert parse("(" * MAX_DEPTH + "a" + ")" * MAX_DEPTH).node == a
    assert parse("NOT " * MAX_DEPTH + "a").matches("a", 1)
    assert parse("(NOT " * 25 + "a" + ")" * 25).matches("b", 1)


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("(" * (MAX_DEPTH + 1) + "a" + ")" * (MAX_DEPTH + 1), MAX_DEPTH),
        ("NOT " * (MAX_DEPTH + 1) + "a", 4 * MAX_DEPTH),
        ("(NOT " * 26 + "a", 5 * 25),
        ("(" * MAX_LENGTH, MAX_DEPTH),
        ("NOT(" * (MAX_LENGTH // 4), 2 * MAX_DEPTH),
    ],
)
def test_too_deep_nesting_is_a_rule_error_not_a_recursion_error(text: str, position: int) -> None:
    with pytest.raises(RuleError) as caught:
        parse(text)
    assert (caught.value.message, caught.value.position) == (f"nested too deeply (more than {MAX_DEPTH} levels)", position)
