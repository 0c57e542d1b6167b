"""The ``connect`` and ``update-email`` commands' provider options.

Every registered provider declares the options it takes at connect time
(``ProviderOption``). :class:`ProviderCommand` adds all of them to the command
once, shows them in ``--help`` under the provider that takes each, and refuses
with exit status 2 an option the chosen provider does not take, naming that
provider's options. Nothing here knows a provider by name: a provider a plugin
registers is grouped and checked the same way.
"""

from __future__ import annotations

from typing import Any

import click


class ProviderCommand(click.Command):
    """``connect`` and ``update-email``: the options of every provider, shown under
    the provider that takes each, and refused for a provider that does not."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: provider name -> (title, its options)
        self.providers: dict[str, tuple[str, list[Any]]] = {}

    def add_providers(self, found: dict[str, Any]) -> None:
        specs: dict[str, Any] = {}
        for name, reg in sorted(found.items()):
            self.providers[name] = (reg.cls.title, list(reg.cls.options))
            for opt in reg.cls.options:
                specs.setdefault(opt.name, opt)
        for opt_name, spec in sorted(specs.items()):
            flag = "--" + opt_name.replace("_", "-")
            if spec.type is bool:  # a switch: `--device-code` alone means true
                self.params.append(click.Option([flag, opt_name], is_flag=True, default=None))
                continue
            kind: Any = click.Choice(list(spec.choices)) if spec.choices else spec.type
            self.params.append(click.Option([flag, opt_name], type=kind, default=None))

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        provided = {o.name for _, opts in self.providers.values() for o in opts}
        rows = [
            record
            for p in self.get_params(ctx)
            if p.name not in provided and (record := p.get_help_record(ctx)) is not None
        ]
        with formatter.section("Options"):
            formatter.write_dl(rows)
        for name, (title, opts) in self.providers.items():
            with formatter.section(f"Options of --provider {name} ({title})"):
                formatter.write_dl([(self.flag_of(o), o.help) for o in opts])

    @staticmethod
    def flag_of(opt: Any) -> str:
        flag = "--" + str(opt.name).replace("_", "-")
        if opt.type is bool:
            return flag
        if opt.choices:
            return f"{flag} [{'|'.join(opt.choices)}]"
        return f"{flag} {'INTEGER' if opt.type is int else 'TEXT'}"

    def check_options(self, provider: str, given: dict[str, Any]) -> None:
        """Exit 2 when an option of another provider was given."""
        if provider not in self.providers:
            return  # the kernel names the registered providers
        _title, opts = self.providers[provider]
        takes = {o.name for o in opts}
        foreign = sorted(k for k in given if k not in takes)
        if foreign:
            flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
            own = " ".join(self.flag_of(o).split()[0] for o in opts) or "none"
            raise click.UsageError(f"provider {provider} does not take {flags}; its options: {own}")
