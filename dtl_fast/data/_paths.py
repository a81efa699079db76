"""Where `dtl-fast data demo DIR` and `dtl-fast data prepare DIR OUT` write, checked the same way
for both: symbolic links followed (their target is written, the link kept), a loop of links or a
link into a folder that is not there refused naming it, a mount point refused. No numpy / torch
here, so the checks cost nothing to import."""
from __future__ import annotations

import errno
import os
from pathlib import Path

def _chain(link: str) -> list:
    """[link, its target, that one's target, ...] as written in the links, while they are links
    (a few hops at most, stopping where a loop comes back), for messages."""
    shown, seen, cur = [link], {os.path.normpath(link)}, link
    while os.path.islink(cur) and len(shown) <= 8:
        target = os.readlink(cur)
        shown.append(target)
        cur = os.path.normpath(os.path.join(os.path.dirname(cur), target))
        if cur in seen:
            break
        seen.add(cur)
    return shown


def follow(given: Path, what: str) -> tuple[Path, str]:
    """(the folder to write, how messages name it) for a path as the user gave it.

    Symbolic links on the path are followed (so the final rename is done on the link's target,
    on its own file system, and the link is kept). Refused with FileNotFoundError, naming the
    link and nothing created: a loop of links (found with os.stat's ELOOP, and by the resolved
    path still being a link: Python 3.13's non-strict resolve returns a looping link instead of
    raising), and a link that points into a folder that does not exist (a drive not mounted?).
    A link to a folder not made yet is fine when the folder that would hold it exists. The name
    is the path as given, plus its target when they differ: "LINK (a symbolic link to TARGET)"."""
    absolute = Path(os.path.abspath(given))
    loop = None
    try:
        os.stat(absolute)
    except OSError as exc:  # ENOENT: new or dangling (checked below); ENOTDIR: a file on the way
        if exc.errno == errno.ELOOP:
            loop = exc
    real = None
    if loop is None:
        try:
            real = absolute.resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a loop, Python < 3.13
            loop = exc
    if loop is None and os.path.islink(real):
        # still a link once followed: a loop where os.stat did not say ELOOP, or a link that
        # cannot be read; either way there is no folder to write
        try:
            os.stat(real)
            err = None
        except OSError as exc:
            err = exc
        if err is None or err.errno != errno.ELOOP:
            why = f" ({err.strerror})" if err is not None else ""
            raise FileNotFoundError(f"{what} {given}: its symbolic link {real} could not be "
                                    f"followed{why}; nothing was changed")
        loop = err
    if loop is not None:
        links = [q for q in (absolute, *absolute.parents) if os.path.islink(q)]
        shown = " -> ".join(_chain(str(links[0]))) if links else str(given)
        raise FileNotFoundError(f"{what} {given}: its symbolic links form a loop ({shown}), so it leads "
                                "to no folder; nothing was changed")
    if os.path.islink(absolute):
        name = f"{given} (a symbolic link to {real})"
    elif real != absolute:
        name = f"{given} (that is {real}: a symbolic link on the way)"
    elif str(given) == "." or ".." in Path(given).parts:
        name = f"{given} ({real})"  # '.' alone does not say which folder
    else:
        name = str(given)
    if not os.path.lexists(real) and not real.parent.is_dir():
        dangling = [q for q in (absolute, *absolute.parents) if os.path.islink(q) and not q.exists()]
        if dangling:
            link = str(dangling[-1])
            hops = _chain(link)
            through = hops[1] + "".join(f", which points to {h}" for h in hops[2:])
            missing = next((p for p in reversed((real, *real.parents)) if not p.exists()), real)
            raise FileNotFoundError(f"{what} {name}: the symbolic link {link} points to {through}, and "
                                    f"{missing} does not exist (a drive not mounted?); nothing was "
                                    "changed")
    above = next((p for p in real.parents if os.path.lexists(p)), None)
    if above is not None and not above.is_dir():
        raise FileExistsError(f"{what} {name}: {above} is a file, not a folder; nothing was changed")
    return real, name


def inside(path: Path, folder: Path) -> bool:
    """path is folder or lies under it (both absolute, resolved as the caller needs)."""
    return path == folder or folder in path.parents


def lexical(given: Path) -> Path:
    """Where the path as given sits, its last component not followed: for a link, the place of
    the link itself (its folder resolved)."""
    absolute = Path(os.path.abspath(given))
    if absolute == absolute.parent:
        return absolute
    return absolute.parent.resolve() / absolute.name


def refuse_mount_point(real: Path, name: str, what: str, command: str, example: str) -> None:
    """ValueError when real is a mount point: the build writes a new folder beside it and renames
    it into its place, and a mount point can be neither renamed (EBUSY) nor replaced; the new
    folder would also be written on the parent's file system, not the mounted one."""
    if real.is_dir() and os.path.ismount(real):
        raise ValueError(f"{what} {name} is a mount point (the top folder of a file system): {command} "
                         "writes a new folder beside it and renames that into its place, which cannot "
                         "be done to a mount point. Nothing was changed; give a folder inside it, "
                         f"e.g. {real / example}")


def refuse_the_working_folder(real: Path, name: str, what: str, command: str, why: str = "") -> None:
    """FileExistsError when real is the current folder or holds it: the build renames a new
    folder into real's place, so a shell in it would be left in a deleted folder, seeing nothing
    (a folder cannot be renamed onto '.' either: EBUSY). `why` says why a build is needed."""
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return
    if inside(cwd, real):
        because = f" {why}, and" if why else ""
        raise FileExistsError(f"{what} {name} is the current folder or holds it:{because} {command} puts "
                              "a new folder in its place, which a shell inside it would not see. Nothing "
                              f"was changed; run the command from outside it (cd {real.parent} first)")


def keep_aside(folder: Path, target: Path, label: str, tag: str) -> Path:
    """Renames folder to a visible sibling of target, TARGET.<label>-<tag> (never a name the
    stale-temp cleanup deletes), and returns it."""
    kept = target.parent / f"{target.name}.{label}-{tag}"
    os.rename(folder, kept)
    return kept
