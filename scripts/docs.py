"""Build the course's docs site offline into `_site/`, without Quarto and without running a notebook.

nbdev processes the notebooks (`_proc/`: show_doc output, doc links, front matter; the pages `nbdev-docs` gives Quarto).
`convert` maps the Quarto dialect left in them to MyST: front matter -> title, `#|` options -> cell tags,
`output: asis` (show_doc) -> markdown, callouts -> admonitions. Sphinx + MyST-NB renders the stored outputs with
sphinx-book-theme, in the order of `nbs/sidebar.yml`. Usage: `scripts/docs` (or `python scripts/docs.py --help`)."""

import argparse, hashlib, json, os, re, shutil, sys, time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
WIDGET = 'application/vnd.jupyter.widget-view+json'
TAGS = {
    ('echo', 'false'): 'remove-input',
    ('output', 'false'): 'remove-output',
    ('include', 'false'): 'remove-cell',
    ('code-fold', 'true'): 'hide-input',
}  # Quarto cell options -> MyST-NB cell tags; `code-fold: show` stays open
KEEP = {'slow'}  # nbdev flags the reader should see (a full-profile cell, shown with its stored outputs)
CONF = dict(  # Sphinx settings (no conf.py: the site is generated, and this is all of its configuration)
    extensions=['myst_nb'],
    html_theme='sphinx_book_theme',
    root_doc='index',
    language='en',
    nb_execution_mode='off',  # stored outputs only: nbdev-test runs the notebooks, the docs never do
    nb_render_markdown_format='myst',
    nb_ipywidgets_js={},  # no widget JavaScript from a CDN
    myst_enable_extensions=['colon_fence', 'attrs_block'],
    myst_heading_anchors=4,
    html_static_path=['_static'],
    html_css_files=['styles.css'],
    html_copy_source=False,
    html_show_sourcelink=False,
    html_theme_options=dict(
        home_page_in_toc=True, show_navbar_depth=2, use_download_button=False, navbar_persistent=[]
    ),
    html_context=dict(default_mode='light'),  # unset, the theme logs a console error on a first visit
)  # no MathJax: it would come from a CDN; vendor it (npm `mathjax`, `mathjax_path`) if a chapter needs typeset math


def nav(items):
    "sidebar.yml `contents` -> [notebook | (section title, [...])], Quarto's forms: a path, `href`/`file`, `section`"
    out = []
    for it in items or []:
        if isinstance(it, dict) and 'section' in it:
            out.append((it['section'], nav(it.get('contents'))))
        else:
            out.append(it.get('href') or it.get('file') if isinstance(it, dict) else it)
    return out


def fix_md(s):
    "Quarto/nbdev markdown -> MyST: source links (they need a repo URL) and link attributes dropped, callouts"
    s = re.sub(r'\[source\]\((?!https?:)[^)]*\)(\{[^}\n]*\})?', '', s)
    s = re.sub(r'(\]\([^)\s]*\))\{[^}\n]*\}', r'\1', s)

    def callout(m):
        title = re.search(r'title="([^"]*)"', m[2])
        return f':::{{admonition}} {title[1]}\n:class: {m[1]}' if title else f':::{{{m[1]}}}'

    return re.sub(r'^:::\s*\{\.callout-(\w+)([^}]*)\}', callout, s, flags=re.M)


def fix_links(nbs, pages):
    "nbdev's doc links (`/model.html#vlanet.encode`) -> MyST page links to a heading that exists (else its class's)"
    from myst_parser.slugs import github_slugify as slug

    md = {n: [c for c in nb['cells'] if c['cell_type'] == 'markdown'] for n, nb in nbs.items()}
    heads = {
        n: {slug(h) for c in cs for h in re.findall(r'^#{1,4} +(.+?) *$', c['source'], re.M)} for n, cs in md.items()
    }

    def link(m):
        if (page := pages.get(m[1])) is None:
            return m[0]
        hit = [a for a in (m[2], (m[2] or '').split('.')[0]) if a and slug(a) in heads[page]]
        return f']({page}#{slug(hit[0])})' if hit else f']({page})'

    for c in (c for cs in md.values() for c in cs):
        c['source'] = re.sub(r'\]\(/([^)#\s]+\.html)(?:#([^)\s]*))?\)', link, c['source'])


def cell(kind, src, id=None):
    return dict(cell_type=kind, id=id or hashlib.sha1(src.encode()).hexdigest()[:12], metadata={}, source=src)


def convert(nb, toctree=''):
    "One nbdev-processed notebook -> a MyST-NB notebook (outputs as stored)"
    cells = []
    for c in nb['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'raw' and (fm := re.match(r'---\n(.*?)\n---', src, re.S)):
            fm = yaml.safe_load(fm[1]) or {}
            desc = f"\n\n{{.description}}\n{fm['description']}" if fm.get('description') else ''
            if 'title' in fm:  # (without one, Sphinx fails the build: a toctree entry without a title)
                cells.append(cell('markdown', f"# {fm['title']}{desc}"))
        elif c['cell_type'] == 'markdown':
            cells.append({**c, 'source': fix_md(src)})
        elif c['cell_type'] == 'code':
            lines, opts, keep = src.splitlines(), {}, []
            while lines and (m := re.match(r'#\|\s*([\w-]+)\s*:?\s*(.*)$', lines[0])):
                lines.pop(0)
                if m[1] in KEEP:
                    keep.append(m[0])
                else:
                    opts[m[1]] = m[2].strip().strip('"\'').lower()
            if opts.get('output') == 'asis':  # show_doc: Quarto puts its markdown into the page
                md = [''.join(o['data'].get('text/markdown', '')) for o in c['outputs'] if 'data' in o]
                cells.append(cell('markdown', fix_md('\n'.join(md)), id=c.get('id')))
                continue
            for o in c.get('outputs', []):
                if WIDGET in o.get('data', {}):
                    o['data'] = {'text/markdown': '*(An interactive widget: open the notebook in Jupyter to use it.)*'}
            tags = [TAGS[k, v] for k, v in opts.items() if (k, v) in TAGS]
            cells.append({**c, 'source': '\n'.join(keep + lines), 'metadata': {'tags': tags} if tags else {}})
    if toctree:
        cells.append(cell('markdown', toctree))
    nb['metadata'].pop('widgets', None)  # no saved widget state to embed
    nb['metadata'].setdefault('language_info', {'name': 'python'})  # the code's lexer
    return {**nb, 'cells': cells, 'nbformat_minor': max(nb.get('nbformat_minor', 5), 5)}


def write(p, data, written):
    "Write only what changed, so Sphinx rebuilds only the pages that did; `written` collects what this build has"
    p.parent.mkdir(parents=True, exist_ok=True)
    written.add(p)
    if not p.exists() or p.read_bytes() != data:
        p.write_bytes(data)


def sidebar():
    "The course's navigation, from nbs/sidebar.yml (the file nbdev's Quarto site uses)"
    return nav(yaml.safe_load((ROOT / 'nbs' / 'sidebar.yml').read_text())['website']['sidebar']['contents'])


def flat(items):
    return [y for x in items for y in (flat(x[1]) if isinstance(x, tuple) else [x])]


def stage(proc, src):
    "Convert every notebook in `proc` into `src`, with toctrees in sidebar.yml's order; returns the pages"
    side = sidebar()
    nbs = {p.relative_to(proc).as_posix(): json.loads(p.read_text()) for p in sorted(proc.rglob('*.ipynb'))}
    if missing := [x for x in flat(side) if x not in nbs]:
        sys.exit(f'nbs/sidebar.yml lists unknown notebooks: {missing}')
    if extra := [x for x in nbs if x not in flat(side) + ['index.ipynb']]:  # new chapters still get a page
        print(f'[docs] not in nbs/sidebar.yml, listed last under "More": {extra}')
        side.append(('More', extra))
    pages, written = {}, set()
    for name, nb in nbs.items():  # nbdev's page names (`model.html`) -> notebooks, for the doc links
        fm = re.search(r'output-file:\s*(\S+)', ''.join(nb['cells'][0]['source'])) if nb['cells'] else None
        pages[(Path(name).parent / (fm[1] if fm else Path(name).stem + '.html')).as_posix()] = name

    def toc(items, hidden=False):
        lines = []
        for it in items:
            if isinstance(it, tuple):  # a section: a page of its own that lists its chapters
                lines.append('section-' + re.sub(r'\W+', '-', it[0].lower()).strip('-'))
                write(src / f'{lines[-1]}.md', f'# {it[0]}\n\n{toc(it[1])}\n'.encode(), written)
            elif it != 'index.ipynb':
                lines.append(it.removesuffix('.ipynb'))
        return '```{toctree}\n' + ':hidden:\n' * hidden + ':maxdepth: 1\n\n' + '\n'.join(lines) + '\n```'

    toctree = toc(side, hidden=True)
    nbs = {name: convert(nb, toctree if name == 'index.ipynb' else '') for name, nb in nbs.items()}
    fix_links(nbs, pages)
    for name, nb in nbs.items():
        write(src / name, json.dumps(nb, indent=1).encode(), written)
    write(src / '_static' / 'styles.css', (ROOT / 'nbs' / 'styles.css').read_bytes(), written)
    for p in proc.rglob('*'):  # images that markdown cells show
        if p.suffix.lower() in ('.png', '.jpg', '.jpeg', '.gif', '.svg'):
            write(src / p.relative_to(proc), p.read_bytes(), written)
    for p in src.rglob('*'):  # pages whose notebook is gone
        if p.is_file() and p not in written:
            p.unlink()
    return sorted(p.relative_to(src).as_posix() for p in written if p.suffix in ('.ipynb', '.md'))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--fresh', action='store_true', help='rebuild every page, not only the changed ones')
    ap.add_argument('--n-workers', type=int, default=2, help="nbdev's processing workers")
    ap.add_argument('-v', '--verbose', action='store_true', help="show Sphinx's progress")
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # nbdev reads pyproject.toml from the working directory
    from nbdev.config import get_config
    from nbdev.serve import proc_nbs
    from sphinx.application import Sphinx

    t0 = time.time()
    proc = proc_nbs(n_workers=args.n_workers, force=args.fresh)  # `nbdev-proc-nbs` minus its Quarto install
    t1 = time.time()
    build, cfg = ROOT / '_build', get_config()
    pages = stage(proc, build / 'docs')
    # MyST-NB keeps output images beside the output folder, so Sphinx writes under _build/ and _site/ is a copy
    conf = {**CONF, 'project': cfg.title, 'html_title': cfg.title, 'author': cfg.author}
    quiet = {} if args.verbose else {'status': None}
    app = Sphinx(build / 'docs', None, build / 'html', build / 'doctrees', 'html', confoverrides=conf,
                 freshenv=args.fresh, warningiserror=True, **quiet)  # fmt: skip
    app.build(force_all=args.fresh)
    if app.statuscode:
        sys.exit('[docs] Sphinx warned (above): fix the notebook it names; _site/ was not updated')
    keep = {f'{d}.html' for d in app.env.all_docs} | {'genindex.html', 'search.html'}
    for f in (build / 'html').rglob('*.html'):  # Sphinx leaves the HTML of a removed page behind
        if not (rel := f.relative_to(build / 'html').as_posix()).startswith('_') and rel not in keep:
            f.unlink()
    shutil.rmtree(ROOT / '_site', ignore_errors=True)
    shutil.copytree(build / 'html', ROOT / '_site')
    print(f'[docs] {len(pages)} pages: nbdev {t1 - t0:.1f}s, sphinx {time.time() - t1:.1f}s -> _site/index.html')
    return 0


if __name__ == '__main__':
    sys.exit(main())
