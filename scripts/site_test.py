"""Browser test of the docs site in `_site/` (built by `scripts/docs`): headless Chromium opens every page from a
local HTTP server on 127.0.0.1 and checks that no page logs a console error or asks the network for anything, that no
image or link is broken, that every chapter is in the navigation in the course's order, and that search finds an
exported name. It saves screenshots of three pages with text, code and plots, and prints their paths.

Needs Playwright (`pip install -e '.[docs]'`) and a Chromium: Debian's `chromium`, another on PATH, or $VLA_CHROMIUM."""

import argparse, functools, http.server, importlib, os, shutil, sys, threading, urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs  # noqa: E402  (the site's navigation, read the way the build reads it)

ROOT = docs.ROOT
BROWSERS = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')
# Chromium's own background traffic (updates, sync, field trials) would reach for the network: turn it off
FLAGS = [
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--disable-features=Translate,OptimizationHints',
]
PAGE_JS = '''() => ({
  ids: [...document.querySelectorAll('[id]')].map(e => e.id),
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  broken_images: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),
  plots: document.querySelectorAll('.cell_output img').length, code: document.querySelectorAll('.cell_input').length,
  title: [...document.querySelectorAll('main h1')].map(h => h.textContent.trim()).find(Boolean),
  nav: [...document.querySelectorAll('nav.bd-docs-nav a.reference.internal')].map(a => a.getAttribute('href')),
})'''


def chromium():
    "The browser to drive: $VLA_CHROMIUM, else the first Chromium or Chrome on PATH"
    return os.environ.get('VLA_CHROMIUM') or next(filter(None, map(shutil.which, BROWSERS)), None)


def skip_or_fail():
    "Without a browser the test cannot run: CI (`CI` set) fails, a developer's machine is told what to install"
    msg = 'no Chromium found: install it (Debian: apt-get install chromium) or point VLA_CHROMIUM at one'
    if os.environ.get('CI'):
        sys.exit(f'site test: {msg}')
    print(f'site test: SKIPPED, {msg}')
    return 0


def serve(root):
    "A quiet static HTTP server for `root` on a free port of 127.0.0.1, in a daemon thread"

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f'http://127.0.0.1:{srv.server_address[1]}/'


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--site', default=str(ROOT / '_site'))
    ap.add_argument('--shots', default=str(ROOT / '_build' / 'screenshots'), help='where the screenshots go')
    ap.add_argument('--query', default='VLAPolicy', help='an exported name that search must find')
    args = ap.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("site test: needs Playwright: .venv/bin/pip install -e '.[docs]' (or pip install playwright)")
    if not (exe := chromium()):
        return skip_or_fail()
    site, shots = Path(args.site), Path(args.shots)
    if not (site / 'index.html').exists():
        sys.exit(f'site test: {site}/index.html is missing: run scripts/docs first')
    srv, base = serve(site)
    res, seen, outside = {}, {}, []  # check -> its problems; page -> what it holds; requests that left 127.0.0.1

    def route(r):  # a page that reaches outside the local server fails the test, and is not helped
        if r.request.url.startswith(base):
            return r.continue_()
        outside.append(r.request.url)
        r.abort()

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=FLAGS)
            ctx = browser.new_context(viewport={'width': 1280, 'height': 900})
            ctx.route('**/*', route)
            page, errors = ctx.new_page(), []
            page.on('console', lambda m: m.type == 'error' and errors.append(f'console: {m.text}'))
            page.on('pageerror', lambda e: errors.append(f'exception: {e}'))
            page.on('response', lambda r: r.status >= 400 and errors.append(f'HTTP {r.status}: {r.url}'))
            for name in sorted(f.relative_to(site).as_posix() for f in site.rglob('*.html')):
                if name.startswith('_'):
                    continue  # _static/ holds the themes' template fragments, not pages
                errors.clear()
                page.goto(base + name, wait_until='networkidle')
                seen[name] = page.evaluate(PAGE_JS)
                res[f'page {name}'] = errors + [f'broken image {s}' for s in seen[name]['broken_images']]
                res[f'page {name}'] += [] if seen[name]['title'] else ['no title']
            res['no request outside 127.0.0.1'] = outside
            res['links'] = check_links(seen, base, site)
            res['navigation'] = check_nav(seen['index.html']['nav'])
            res['API docs for every exported name'] = check_api(seen)
            res[f'search finds {args.query}'] = check_search(page, base, args.query)
            paths = screenshots(page, base, seen, shots)
            res['screenshots'] = [] if len(paths) == 3 else [f'only {len(paths)} pages have code and plots']
            browser.close()
    finally:
        srv.shutdown()
    for check, bad in res.items():
        print('  FAIL' if bad else '  ok  ', check + ''.join(f'\n        {b}' for b in bad))
    print('screenshots:', *paths, sep='\n  ')
    failed = sum(map(bool, res.values()))
    print(f'site test: {len(res) - failed} passed, {failed} failed')
    return 1 if failed else 0


def check_links(seen, base, site):
    "Every link inside the site reaches a file, and its #fragment an element of the page"
    bad = []
    for name, s in seen.items():
        for url in s['links']:
            if not url.startswith(base):
                continue  # a plain link to another site: not followed offline
            path, _, frag = urllib.parse.unquote(url[len(base) :]).partition('#')
            path = path.split('?')[0] or name
            if not (site / path).is_file():
                bad.append(f'{name}: broken link {url}')
            elif frag and path in seen and frag not in seen[path]['ids']:
                bad.append(f'{name}: no #{frag} in {path}')
    return bad


def check_nav(nav):
    "Every notebook is in the navigation, in the order of nbs/sidebar.yml"
    want = [p.removesuffix('.ipynb') + '.html' for p in docs.flat(docs.sidebar()) if p != 'index.ipynb']
    got = [h for h in nav if not h.startswith(('#', 'section-'))]
    nbs = [
        p.relative_to(ROOT / 'nbs').with_suffix('.html').as_posix()
        for p in (ROOT / 'nbs').rglob('*.ipynb')
        if not any(x.startswith(('.', '_')) for x in p.relative_to(ROOT / 'nbs').parts)
    ]
    bad = [f'navigation lacks {n}' for n in sorted(nbs) if n not in got + ['index.html']]
    return bad + ([] if got[: len(want)] == want else [f'navigation order {got} is not sidebar.yml order {want}'])


def check_api(seen):
    "Every name the library exports (nbdev's index of it) has its API section, a heading with its anchor, on a page"
    from myst_parser.slugs import github_slugify as slug
    from nbdev.config import get_config

    syms = importlib.import_module(f'{get_config().lib_name}._modidx').d['syms']
    names = {k[len(mod) + 1 :] for mod, ks in syms.items() for k in ks}
    ids = {i for s in seen.values() for i in s['ids']}
    return [f'no API docs for {n}' for n in sorted(names) if '.' not in n and n[0] != '_' and slug(n) not in ids]


def check_search(page, base, query):
    "Sphinx's search page finds `query` and links to its API section"
    from playwright.sync_api import TimeoutError

    page.goto(f'{base}search.html?q={query}', wait_until='networkidle')
    try:
        page.wait_for_selector('#search-results ul.search li', timeout=15_000)
    except TimeoutError:
        return [f'search for {query!r} listed nothing']
    hits = page.eval_on_selector_all('#search-results ul.search li a', 'as => as.map(a => a.href)')
    api = [h for h in hits if h.endswith('#' + query.lower())]  # the hit that lands on the name's API section
    return [] if api else [f'search for {query!r} found no API section: {hits}']


def screenshots(page, base, seen, shots, n=3):
    "Screenshots of `n` chapters with code and plots, spread over the course (first, middle, last), at their first plot"
    shots.mkdir(parents=True, exist_ok=True)
    pages = [h for h in seen['index.html']['nav'] if seen.get(h, {}).get('plots') and seen[h]['code']]
    paths = []
    for name in [pages[round(i * (len(pages) - 1) / (n - 1))] for i in range(n)] if len(pages) >= n else pages:
        page.goto(base + name, wait_until='networkidle')
        page.set_viewport_size({'width': 1280, 'height': 1200})
        # the whole first plot at the bottom of the window, the code and prose that lead to it above
        page.locator('.cell_output img').first.evaluate(
            'i => scrollBy(0, i.getBoundingClientRect().bottom - innerHeight + 16)'
        )
        page.screenshot(path=str(path := shots / name.replace('.html', '.png')))
        paths.append(str(path))
    return paths


if __name__ == '__main__':
    sys.exit(main())
