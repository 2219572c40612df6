"""The serving benchmark's table: llmos against the peer, and model processes against the in-process engine."""

from __future__ import annotations

from llmos.bench.serving import IN_PROCESS, LLMOS, PEER, LevelResult, RequestResult, SideResult, format_table


def side(name: str, tokens: int, ttft: float) -> SideResult:
    results = [RequestResult(True, tokens=tokens, ttft=ttft, total=1.0) for _ in range(4)]
    return SideResult(name, "Paris", [LevelResult(16, 4, 2.0, results, [0.001])])


def row_after(lines: list[str], header: str) -> list[str]:
    at = next(index for index, line in enumerate(lines) if header in line)
    return lines[at + 1].split()


def test_ratios_against_the_peer_and_the_cost_of_model_processes() -> None:
    table = format_table([side(LLMOS, 97, 0.105), side(IN_PROCESS, 100, 0.100), side(PEER, 50, 0.2)])
    lines = table.splitlines()
    peer_row = row_after(lines, "(llmos / peer)")
    assert peer_row == ["16", "1.94", "0.525"]
    cost_row = row_after(lines, "(model processes / in-process)")
    assert cost_row == ["16", "0.970", "+5.0", "ms"]
    assert sum("/health while 16 streams decode" in line for line in lines) == 2


def test_without_the_in_process_side_there_is_no_cost_table() -> None:
    table = format_table([side(LLMOS, 97, 0.1), side(PEER, 50, 0.2)])
    assert "(llmos / peer)" in table and "in-process" not in table
