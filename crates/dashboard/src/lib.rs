//! The cluster dashboard: one static page (HTML, script, style) compiled into the binary with
//! `include_str!`, which every agent serves at `/` beside the `/v1` API. The page holds no data:
//! its script polls `/v1/hosts`, `/v1/vms` and `/v1/events` every second with the API token and
//! draws hosts, VMs, replicas with their roles and lag, and the timeline of failovers,
//! re-protections and rule actions (shapes: the `/v1` contract, notes/CLUSTER-API.md).
//!
//! How the browser gets the token: the agent (or `ftvm demo --cluster`) prints
//! [`page_url`], `http://HOST:PORT/#token=TOKEN`. The fragment never leaves the browser (it is
//! not sent to the server, so it is in no log); the page moves it into the tab's
//! sessionStorage, removes it from the address bar, and sends `Authorization: Bearer TOKEN` on
//! each fetch. Without a token, or when the API answers 401, the page shows a form to paste
//! one. The assets need no token: they are the same for everyone.

/// A file of the page, with how to serve it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Asset {
    pub content_type: &'static str,
    pub body: &'static [u8],
}

/// Headers to send with every asset: never cached (a new binary serves a new page), and a
/// content security policy that lets the page run only its own script and fetch only its
/// own origin (the page puts API text into the DOM as text, never as markup, and the policy
/// holds even if that slipped).
pub const HEADERS: &[(&str, &str)] = &[
    ("Cache-Control", "no-store"),
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
         form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
];

const INDEX_HTML: &str = include_str!("assets/index.html");
const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("assets/dashboard.css");
const FAVICON_SVG: &str = include_str!("assets/favicon.svg");

/// The asset at `path` (a request target: any `?query` or `#fragment` is ignored), or `None`
/// for a path that is not the page's (answer 404 then).
pub fn asset(path: &str) -> Option<Asset> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let (content_type, body) = match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", INDEX_HTML),
        "/dashboard.js" => ("text/javascript; charset=utf-8", DASHBOARD_JS),
        "/dashboard.css" => ("text/css; charset=utf-8", DASHBOARD_CSS),
        "/favicon.svg" => ("image/svg+xml", FAVICON_SVG),
        _ => return None,
    };
    Some(Asset { content_type, body: body.as_bytes() })
}

/// The address to open the dashboard of the API at `base` (`http://HOST:PORT`, with or
/// without a trailing `/` or `/v1`) logged in with `token`.
pub fn page_url(base: &str, token: &str) -> String {
    let base = base.trim_end_matches('/');
    let base = base.strip_suffix("/v1").unwrap_or(base);
    format!("{base}/#token={}", percent_encode(token))
}

/// Everything but RFC 3986's unreserved characters, as %XX (the page decodes with
/// decodeURIComponent).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_its_files_are_served_and_nothing_else() {
        let index = asset("/").expect("the page");
        assert_eq!(index.content_type, "text/html; charset=utf-8");
        assert_eq!(asset("/index.html"), Some(index));
        assert_eq!(asset("/?token=x"), Some(index));
        assert!(asset("/dashboard.js").is_some_and(|a| a.content_type.starts_with("text/javascript")));
        assert!(asset("/dashboard.css").is_some_and(|a| a.content_type.starts_with("text/css")));
        for path in ["/v1/vms", "/metrics", "/../etc/passwd", "/dashboard.js/", "", "index.html", "/INDEX.HTML"] {
            assert_eq!(asset(path), None, "{path}");
        }
    }

    #[test]
    fn the_page_loads_exactly_the_files_that_are_served() {
        let html = std::str::from_utf8(asset("/").expect("page").body).expect("utf-8");
        for file in ["/dashboard.js", "/dashboard.css", "/favicon.svg"] {
            assert!(html.contains(&format!("\"{file}\"")), "{file} is not referenced");
            assert!(asset(file).is_some(), "{file} is not served");
        }
    }

    #[test]
    fn the_page_url_carries_the_token_in_the_fragment() {
        assert_eq!(page_url("http://127.0.0.1:7780", "s3cret"), "http://127.0.0.1:7780/#token=s3cret");
        assert_eq!(
            page_url("http://127.0.0.1:7780/v1", "a b#%/é"),
            "http://127.0.0.1:7780/#token=a%20b%23%25%2F%C3%A9"
        );
        assert_eq!(page_url("http://h:1/", "t"), "http://h:1/#token=t");
    }
}
