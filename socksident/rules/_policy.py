"""`RulesPolicy`: a rules file as an `IPolicy`, reloadable on SIGHUP."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable, Optional

from twisted.logger import Logger
from zope.interface import implementer

from socksident.policy import (
    Decision,
    DecisionResult,
    IdentMode,
    IEarlyRefusal,
    IPolicy,
    PolicyContext,
    check_ident,
    deny,
)
from socksident.rules._model import Rule, RuleSet
from socksident.rules._parser import RulesError, load_rules
from socksident.rules._template import expand_command
from socksident.socks4 import Request

__all__ = ["RulesPolicy"]

log = Logger()


@implementer(IPolicy, IEarlyRefusal)
class RulesPolicy:
    """The policy of a rules file, reloadable (e.g. on SIGHUP).

    Each check works on the rule set current when it starts, so a reload
    never changes a decision already under way.  `run_command` receives each
    expanded command (twistd passes a `socksident.commands.CommandRunner`);
    None runs nothing.  ``#NO_IDENTD`` and ``#BAD_ID`` run when ident has
    spoken; a line's own command runs from the decision's ``on_granted``,
    when the client has its reply 90, as the original ran it after its
    connect.
    """

    def __init__(
        self,
        path: str,
        ident_mode: IdentMode = IdentMode.OFF,
        run_command: Optional[Callable[[str], object]] = None,
    ) -> None:
        self.path = path
        self.ident_mode = ident_mode
        self._run_command = run_command
        self._rules = load_rules(path)
        _warn_unrun_commands(self._rules)

    @property
    def rules(self) -> RuleSet:
        return self._rules

    def reload(self) -> bool:
        """Re-read the rules and user lists; on error keep the old rules."""
        try:
            rules = load_rules(self.path)
        except RulesError as e:
            log.error(
                "rules reload failed, keeping the old rules: {error}",
                path=self.path,
                error=str(e),
            )
            return False
        self._rules = rules
        _warn_unrun_commands(rules)
        log.info(
            "rules reloaded from {path}: {count} lines", path=self.path, count=len(rules.rules)
        )
        return True

    def refuse_early(self, request: Request, context: PolicyContext) -> Optional[Decision]:
        reason = self._rules.refusal_before_resolving(request, context.client_host)
        return None if reason is None else deny(reason)

    def check(self, request: Request, context: PolicyContext) -> DecisionResult:
        rules = self._rules
        evaluation = rules.evaluate(request, context)
        rule = evaluation.rule
        if not evaluation.permitted or rule is None:
            return deny(evaluation.reason, rule.location if rule is not None else None)
        mode = rule.ident_mode if rule.ident_mode is not None else self.ident_mode
        result = check_ident(mode, request, context, evaluation.reason, rule.location)
        if isinstance(result, Decision):
            return self._with_commands(result, rules, rule, request, context)
        return result.addCallback(self._with_commands, rules, rule, request, context)

    @staticmethod
    def _routed(decision: Decision, rule: Rule) -> Decision:
        """The permitting line's route (via=...) goes with its decision."""
        return decision if rule.route is None else replace(decision, route=rule.route)

    def _with_commands(
        self,
        decision: Decision,
        rules: RuleSet,
        rule: Rule,
        request: Request,
        context: PolicyContext,
    ) -> Decision:
        decision = self._routed(decision, rule)
        if self._run_command is None:
            return decision
        answer = decision.ident
        ident_user = answer.user_id if answer is not None and answer.usable else None
        for template in rules.commands_for(decision):
            self._run(expand_command(template, request, context, ident_user, os.getpid()))
        if not decision.granted or rule.shell_command is None:
            return decision
        command = expand_command(rule.shell_command, request, context, ident_user, os.getpid())
        return replace(decision, on_granted=lambda: self._run(command))

    def _run(self, command: str) -> None:
        assert self._run_command is not None
        try:
            self._run_command(command)
        except Exception:
            log.failure("rule command {command!r} could not be started", command=command)


def _warn_unrun_commands(rules: RuleSet) -> None:
    for rule in rules.rules:
        if not rule.permits and rule.shell_command is not None:
            log.warn(
                "{location}: a command on a deny line never runs",
                location=rule.location,
                command=rule.shell_command,
            )
