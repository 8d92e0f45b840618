"""A chat template renders in a bounded sandbox (issue 33): loops, recursion, allocations and
other templates end in one line, quickly, and ordinary templates render as before."""

from __future__ import annotations

import time

import pytest

from edgevlm.errors import UserError
from edgevlm.runtime.chat import ChatTemplate
from edgevlm.runtime.sandbox import MAX_SECONDS, MAX_SIZE

MESSAGES = [{"role": "user", "content": "hello"}]


def refused(source: str) -> str:
    """The one line rendering `source` ends in; it must come within the time bound."""
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        ChatTemplate(source).render(MESSAGES)
    assert time.perf_counter() - t0 < MAX_SECONDS + 1.5, "the bound did not stop it in time"
    text = str(e.value)
    assert text and "\n" not in text.strip(), text
    return text


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) recursive %}{% if loop.depth < 3 %}{{ loop(range(100000)) }}"
    "{% endif %}{% endfor %}",
])
def test_nested_loops_stop_at_the_step_or_time_budget(source):
    text = refused(source)
    assert "1,000,000 steps" in text or f"more than {MAX_SECONDS:g} s" in text


def test_exponential_macro_recursion_stops_at_the_step_or_time_budget():
    text = refused("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
                   "{% endmacro %}{{ f(40) }}")
    assert "1,000,000 steps" in text or f"more than {MAX_SECONDS:g} s" in text


@pytest.mark.parametrize("source", [
    "{{ 'a' * 1500000000 }}",
    "{{ ['a'] * 10**9 }}",
    "{{ 'a'|center(10**9) }}",
    "{{ 'a'.ljust(10**9) }}",
    "{{ ('\\n' * 1000000)|indent(1000) }}",
    "{{ '%1000000000d' % 1 }}",
    "{{ '{:1000000000}'.format(1) }}",
    "{{ '%1000000000d'|format(1) }}",
    "{{ ('a' * 1000000).replace('a', 'a' * 1000) }}",
    "{{ ('a' * 1000000)|replace('a', 'a' * 1000) }}",
    "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s|length }}",
    "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}",
    "{% set s = 'a' * 4000000 %}{{ [s, s, s, s, s, s, s, s, s, s] }}",
    "{% set s = 'a' * 4000000 %}{{ [s, s]|join }}",
    "{% set s = 'a' * 4000000 %}{% set t %}{{ s }}{{ s }}{% endset %}",
    "{{ ([[1]] * 100000)|sum(start=[]) }}",
])
def test_allocations_past_the_size_bound_are_refused_before_they_are_made(source):
    assert f"over {MAX_SIZE:,} characters" in refused(source) or "sum over" in refused(source)


@pytest.mark.parametrize("source, number", [("{{ 2 ** 100000 }}", "power"),
                                            ("{{ 2 ** 2000 * 2 ** 2000 * 2 ** 2000 }}", "product")])
def test_huge_integers_are_refused(source, number):
    assert f"a {number} would have over" in refused(source)


@pytest.mark.parametrize("source, verb", [("{% include 'x' %}", "include"),
                                          ("{% import 'x' as y %}", "import"),
                                          ("{% from 'x' import y %}", "import from"),
                                          ("{% extends 'x' %}", "extend")])
def test_other_templates_are_a_template_error_when_it_compiles(source, verb):
    with pytest.raises(UserError) as e:
        ChatTemplate(source)
    text = str(e.value)
    assert f"may not {verb} another template" in text and "\n" not in text, text


@pytest.mark.parametrize("source, match", [
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ 10.0 ** 1000 }}", "OverflowError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{{ lipsum(1000000) }}", "'lipsum' is undefined"),
])
def test_arithmetic_and_recursion_errors_are_one_line(source, match):
    assert match in refused(source)


def test_ordinary_templates_render_as_before():
    source = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
              "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}"
              "{% for p in m['content'] %}{{ p | tojson }}{% endfor %}{% endif %}"
              "{{ '<|im_end|>\\n' }}{% endfor %}{% for i in range(3) %}{{ loop.index }}"
              "{% endfor %}{{ ', '.join(['a', 'b']) }}{{ '%s-%d' % ('x', 2) }}"
              "{{ '{}!'.format('hey') }}{{ 'ab' * 2 }}{{ 'x'|center(5) }}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    text = ChatTemplate(source).render([{"role": "user", "content": " hi "},
                                        {"role": "user", "content": [{"type": "image"}]}])
    assert text == ('<|im_start|>user\nhi<|im_end|>\n<|im_start|>user\n{"type": "image"}'
                    '<|im_end|>\n123a, bx-2hey!abab  x  <|im_start|>assistant\n')


def test_raise_exception_is_still_the_templates_own_message():
    text = refused("{{ raise_exception('only user and assistant roles') }}")
    assert "only user and assistant roles" in text
