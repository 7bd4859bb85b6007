//! `#[task]`: turns an `async fn` into a Celeriac task type.
//!
//! The attribute expands to calls of `celeriac`'s public API only: a unit struct named after
//! the function implementing `celeriac::Task`, with `s(..)` / `si(..)` to build signatures,
//! `delay(&app, ..)` to send, and `call(..)` to run the body directly.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, FnArg, ItemFn, Lit, Pat, ReturnType, Type, TypeReference};

const OPTIONS: &[&str] = &[
    "name",
    "max_retries",
    "default_retry_delay",
    "autoretry_for",
    "retry_backoff",
    "retry_backoff_max",
    "retry_jitter",
    "acks_late",
    "ignore_result",
    "track_started",
    "time_limit",
    "soft_time_limit",
    "rate_limit",
    "queue",
    "priority",
    "blocking",
    "bind",
    "on_success",
    "on_retry",
    "on_failure",
    "after_return",
];

/// Makes an `async fn` a task. Options are Celery's: `name`, `max_retries` (3, or `None` for
/// unlimited), `default_retry_delay` (180), `autoretry_for` (list of error type names),
/// `retry_backoff` (`true` or a factor), `retry_backoff_max` (600), `retry_jitter` (true),
/// `acks_late`, `ignore_result`, `track_started`, `time_limit`, `soft_time_limit`,
/// `rate_limit` (`"10/s"`), `queue`, `priority`, `blocking` (*Celeriac*: the body blocks
/// instead of awaiting, so it runs on a blocking thread, or in a child process with the
/// process pool), `bind` (first parameter is the `celeriac::Request`), and hooks `on_success`, `on_retry`, `on_failure`, `after_return`
/// (paths to plain functions):
///
/// - `on_success`: `fn(&celeriac::Request, &serde_json::Value)` (the encoded return value)
/// - `on_retry`, `on_failure`: `fn(&celeriac::Request, &celeriac::ExceptionInfo)`
/// - `after_return`: `fn(&celeriac::Request, &celeriac::State, &serde_json::Value)`
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    let func = match syn::parse::<ItemFn>(item) {
        Ok(f) => f,
        Err(e) => return e.to_compile_error().into(),
    };
    match expand(attr.into(), func) {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

#[derive(Default)]
struct Options {
    values: Vec<(String, Expr)>,
}

impl Options {
    fn get(&self, key: &str) -> Option<&Expr> {
        self.values.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn flag(&self, key: &str) -> syn::Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Expr::Lit(ExprLit { lit: Lit::Bool(b), .. })) => Ok(Some(b.value)),
            Some(other) => Err(syn::Error::new(other.span(), format!("`{key}` takes `true` or `false`"))),
        }
    }

    fn string(&self, key: &str) -> syn::Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Expr::Lit(ExprLit { lit: Lit::Str(s), .. })) => Ok(Some(s.value())),
            Some(other) => {
                Err(syn::Error::new(other.span(), format!("`{key}` takes a string literal, e.g. {key} = \"...\"")))
            }
        }
    }

    fn number(&self, key: &str) -> syn::Result<Option<Tokens>> {
        match self.get(key) {
            None => Ok(None),
            Some(Expr::Lit(ExprLit { lit: Lit::Int(i), .. })) => {
                let v: f64 = i.base10_parse()?;
                Ok(Some(quote!(#v)))
            }
            Some(Expr::Lit(ExprLit { lit: Lit::Float(f), .. })) => {
                let v: f64 = f.base10_parse()?;
                Ok(Some(quote!(#v)))
            }
            Some(other) => Err(syn::Error::new(other.span(), format!("`{key}` takes a number of seconds"))),
        }
    }
}

fn parse_options(attr: Tokens) -> syn::Result<Options> {
    let mut options = Options::default();
    let parser = syn::meta::parser(|meta| {
        let path = &meta.path;
        let key = path.get_ident().map(|i| i.to_string()).unwrap_or_else(|| pretty(path));
        if !OPTIONS.contains(&key.as_str()) {
            let hint = closest_option(&key).map(|o| format!("did you mean `{o}`? ")).unwrap_or_default();
            return Err(
                meta.error(format!("unknown task option `{key}`; {hint}valid options are: {}", OPTIONS.join(", ")))
            );
        }
        let value: Expr =
            if meta.input.peek(syn::Token![=]) { meta.value()?.parse()? } else { syn::parse_quote!(true) };
        options.values.push((key, value));
        Ok(())
    });
    syn::parse::Parser::parse2(parser, attr)?;
    Ok(options)
}

/// The option nearest to a misspelt `key` (at most three edits away), for "did you mean".
fn closest_option(key: &str) -> Option<&'static str> {
    OPTIONS.iter().map(|o| (edit_distance(key, o), *o)).filter(|(d, _)| *d <= 3 && *d < key.len()).min().map(|(_, o)| o)
}

/// Levenshtein distance, small inputs only.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

/// What to write instead of a borrowed parameter type: `String` for `&str`, `Vec<T>` for `&[T]`.
fn owned_suggestion(r: &TypeReference) -> String {
    match &*r.elem {
        Type::Path(p) if p.path.is_ident("str") => "String".to_owned(),
        Type::Slice(s) => format!("Vec<{}>", pretty(&s.elem)),
        elem => pretty(elem),
    }
}

/// Tokens as a user would write them in a message (`Vec<u8>`, not `Vec < u8 >`).
fn pretty(tokens: impl quote::ToTokens) -> String {
    let spaced = tokens.to_token_stream().to_string();
    [
        (" :: ", "::"),
        (":: ", "::"),
        (" <", "<"),
        ("< ", "<"),
        (" >", ">"),
        (" ,", ","),
        ("& ", "&"),
        ("[ ", "["),
        (" ]", "]"),
    ]
    .iter()
    .fold(spaced, |text, (from, to)| text.replace(from, to))
}

fn expand(attr: Tokens, func: ItemFn) -> syn::Result<Tokens> {
    let opts = parse_options(attr)?;
    let sig = &func.sig;
    if sig.asyncness.is_none() {
        return Err(syn::Error::new(
            sig.fn_token.span(),
            "#[task] needs an `async fn`: write `async fn` (tasks run on the worker's async runtime)",
        ));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &sig.generics,
            "#[task] functions cannot be generic: a task is registered under one name with one signature; \
             use concrete types (`serde_json::Value` accepts any JSON), or write one task per type",
        ));
    }
    let ret_ty = match &sig.output {
        ReturnType::Type(_, ty) if returns_result(ty) => ty.clone(),
        ReturnType::Type(_, ty) => {
            return Err(syn::Error::new_spanned(
                ty,
                format!(
                    "#[task] functions return a `Result`: write `-> celeriac::TaskResult<{}>` and return `Ok(..)` \
                     (any `Result<T, E>` whose error converts into `celeriac::TaskError` works too)",
                    pretty(ty)
                ),
            ));
        }
        ReturnType::Default => {
            return Err(syn::Error::new(
                sig.paren_token.span.close(),
                "#[task] functions return a `Result`: add `-> celeriac::TaskResult<()>` and return `Ok(())` \
                 (the result tells the worker whether the task succeeded)",
            ));
        }
    };
    let bind = opts.flag("bind")?.unwrap_or(false);
    let ident = &sig.ident;
    let vis = &func.vis;
    let attrs = &func.attrs;
    let body = &func.block;

    let mut params = Vec::new();
    let mut request_param = None;
    for (i, input) in sig.inputs.iter().enumerate() {
        let FnArg::Typed(pt) = input else {
            return Err(syn::Error::new(input.span(), "#[task] functions cannot take `self`"));
        };
        let Pat::Ident(pi) = &*pt.pat else {
            return Err(syn::Error::new(
                pt.pat.span(),
                "task parameters must be plain names (`x: i64`): the name is the keyword argument",
            ));
        };
        if bind && i == 0 {
            request_param = Some((pi.ident.clone(), (*pt.ty).clone()));
            continue;
        }
        if let Type::Reference(r) = &*pt.ty {
            return Err(syn::Error::new_spanned(
                r,
                format!(
                    "task parameter `{}` must be an owned value: write `{}` instead of `{}` (arguments are decoded \
                     from the message, there is nothing to borrow from)",
                    pi.ident,
                    owned_suggestion(r),
                    pretty(r)
                ),
            ));
        }
        params.push((pi.ident.clone(), (*pt.ty).clone()));
    }
    if bind && request_param.is_none() {
        return Err(syn::Error::new(
            sig.paren_token.span.join(),
            format!(
                "`bind = true` passes the task's `celeriac::Request` as the first parameter: add it, e.g. \
                 `async fn {ident}(request: celeriac::Request)`, or remove `bind = true`"
            ),
        ));
    }

    let name_expr = match opts.string("name")? {
        Some(n) => quote!(#n),
        None => {
            let fn_name = ident.to_string();
            quote!({
                static NAME: ::std::sync::OnceLock<::std::string::String> = ::std::sync::OnceLock::new();
                NAME.get_or_init(|| ::std::format!("{}.{}", ::core::module_path!().replace("::", "."), #fn_name))
                    .as_str()
            })
        }
    };

    let options = options_tokens(&opts)?;
    let hooks = hook_tokens(&opts)?;

    let names: Vec<_> = params.iter().map(|(n, _)| n).collect();
    let types: Vec<_> = params.iter().map(|(_, t)| t).collect();
    let count = params.len();
    let param_names: Vec<String> = params.iter().map(|(n, _)| n.to_string()).collect();
    let asserts = params
        .iter()
        .map(|(_, ty)| quote_spanned!(ty.span()=> const _: () = ::celeriac::__private::assert_task_value::<#ty>();));

    // Calls that need serde are written with the parameter's type spelled out and spanned, so a
    // type that is not serde-serializable is reported at that type, not at `#[task]`.
    let encode_args = params.iter().map(|(n, ty)| quote_spanned!(ty.span()=> ::celeriac::__private::arg::<#ty>(#n)));
    let decode_args = params.iter().enumerate().map(|(i, (n, ty))| {
        let name = n.to_string();
        let take = quote_spanned!(ty.span()=> ::celeriac::Args::take::<#ty>);
        quote!(let #n: #ty = #take(&mut __args, #i, #name).map_err(::celeriac::TaskError::Arguments)?;)
    });

    let (req_decl, req_call, req_take) = match &request_param {
        Some((n, ty)) => {
            // A local trait only `celeriac::Request` implements: a wrong first parameter type is
            // reported at that type with this message, instead of as a type mismatch at `#[task]`.
            let convert = quote_spanned!(ty.span()=> <#ty as BindRequest>::from_request);
            let check = quote! {
                #[diagnostic::on_unimplemented(
                    message = "with `bind = true`, the first parameter is the task's `celeriac::Request`, not `{Self}`",
                    label = "expected `celeriac::Request`",
                    note = "add a first parameter `request: celeriac::Request`, or remove `bind = true`"
                )]
                trait BindRequest {
                    fn from_request(request: ::celeriac::Request) -> Self;
                }
                impl BindRequest for ::celeriac::Request {
                    fn from_request(request: ::celeriac::Request) -> Self {
                        request
                    }
                }
            };
            (quote!(#n: #ty,), quote!(#convert(__request),), check)
        }
        None => (quote!(), quote!(), quote!(let _ = __request;)),
    };
    let struct_doc = format!("The `{ident}` task (generated by `#[celeriac::task]`).");

    Ok(quote! {
        #[doc = #struct_doc]
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, Default)]
        #vis struct #ident;

        #(#asserts)*

        impl #ident {
            /// The name this task is registered and sent under.
            pub fn name() -> &'static str {
                #name_expr
            }

            /// A signature (task call) with these arguments.
            #[allow(clippy::too_many_arguments)]
            pub fn s(#(#names: #types),*) -> ::celeriac::Signature {
                ::celeriac::Signature::new(Self::name(), ::std::vec![#(#encode_args),*])
            }

            /// An immutable signature: a parent's result is not prepended.
            #[allow(clippy::too_many_arguments)]
            pub fn si(#(#names: #types),*) -> ::celeriac::Signature {
                Self::s(#(#names),*).immutable()
            }

            /// Sends the task with these arguments.
            #[allow(clippy::too_many_arguments)]
            pub async fn delay(app: &::celeriac::App, #(#names: #types),*) -> ::core::result::Result<::celeriac::AsyncResult, ::celeriac::Error> {
                Self::s(#(#names),*).delay(app).await
            }

            /// Runs the function body directly, without a broker (for unit tests).
            #(#attrs)*
            #[allow(clippy::too_many_arguments)]
            pub async fn call(#req_decl #(#names: #types),*) -> #ret_ty #body
        }

        impl ::celeriac::Task for #ident {
            fn name(&self) -> &str {
                Self::name()
            }

            fn options(&self) -> ::celeriac::TaskOptions {
                #options
            }

            fn params(&self) -> ::celeriac::Params {
                ::celeriac::Params::positional(&[#(#param_names),*], #bind)
            }

            fn run(&self, __request: ::celeriac::Request, mut __args: ::celeriac::Args) -> ::celeriac::__private::BoxFuture<'static, ::celeriac::TaskResult<::celeriac::__private::serde_json::Value>> {
                #req_take
                ::std::boxed::Box::pin(async move {
                    #(#decode_args)*
                    __args.finish(#count).map_err(::celeriac::TaskError::Arguments)?;
                    match Self::call(#req_call #(#names),*).await {
                        ::core::result::Result::Ok(value) => ::celeriac::__private::encode(Self::name(), value),
                        ::core::result::Result::Err(error) => ::core::result::Result::Err(::core::convert::Into::<::celeriac::TaskError>::into(error)),
                    }
                })
            }

            #hooks
        }
    })
}

fn returns_result(ty: &Type) -> bool {
    match ty {
        Type::Path(p) => p.path.segments.last().is_some_and(|s| s.ident == "Result" || s.ident == "TaskResult"),
        _ => false,
    }
}

fn options_tokens(opts: &Options) -> syn::Result<Tokens> {
    let opt_f64 = |key: &str| -> syn::Result<Tokens> {
        Ok(match opts.number(key)? {
            Some(v) => quote!(::core::option::Option::Some(#v)),
            None => quote!(::core::option::Option::None),
        })
    };
    let opt_bool = |key: &str| -> syn::Result<Tokens> {
        Ok(match opts.flag(key)? {
            Some(v) => quote!(::core::option::Option::Some(#v)),
            None => quote!(::core::option::Option::None),
        })
    };
    let opt_string = |key: &str| -> syn::Result<Tokens> {
        Ok(match opts.string(key)? {
            Some(v) => quote!(::core::option::Option::Some(::std::string::String::from(#v))),
            None => quote!(::core::option::Option::None),
        })
    };
    let max_retries = match opts.get("max_retries") {
        None => quote!(::core::option::Option::Some(3u32)),
        Some(Expr::Path(p)) if p.path.is_ident("None") => quote!(::core::option::Option::None),
        Some(Expr::Lit(ExprLit { lit: Lit::Int(i), .. })) => {
            let v: u32 = i.base10_parse()?;
            quote!(::core::option::Option::Some(#v))
        }
        Some(other) => {
            return Err(syn::Error::new(
                other.span(),
                "`max_retries` takes a whole number, or `None` to retry forever",
            ));
        }
    };
    let default_retry_delay = opts.number("default_retry_delay")?.unwrap_or(quote!(180.0));
    let autoretry = match opts.get("autoretry_for") {
        None => Vec::new(),
        Some(Expr::Array(a)) => a
            .elems
            .iter()
            .map(|e| match e {
                Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => Ok(s.value()),
                Expr::Path(p) => Ok(p.path.segments.last().map(|s| s.ident.to_string()).unwrap_or_default()),
                other => Err(syn::Error::new(
                    other.span(),
                    "`autoretry_for` lists error type names, e.g. [\"Timeout\", HttpError]",
                )),
            })
            .collect::<syn::Result<Vec<_>>>()?,
        Some(other) => {
            return Err(syn::Error::new(
                other.span(),
                "`autoretry_for` takes a list, e.g. autoretry_for = [\"Timeout\"]",
            ));
        }
    };
    let backoff_max = match opts.get("retry_backoff_max") {
        None => quote!(600u64),
        Some(Expr::Lit(ExprLit { lit: Lit::Int(i), .. })) => {
            let v: u64 = i.base10_parse()?;
            quote!(#v)
        }
        Some(other) => return Err(syn::Error::new(other.span(), "`retry_backoff_max` takes whole seconds")),
    };
    let jitter = opts.flag("retry_jitter")?.unwrap_or(true);
    let backoff = match opts.get("retry_backoff") {
        None | Some(Expr::Lit(ExprLit { lit: Lit::Bool(syn::LitBool { value: false, .. }), .. })) => {
            quote!(::core::option::Option::None)
        }
        Some(Expr::Lit(ExprLit { lit: Lit::Bool(_), .. })) => {
            quote!(::core::option::Option::Some(::celeriac::retry::Backoff { factor: 1, maximum: #backoff_max, jitter: #jitter }))
        }
        Some(Expr::Lit(ExprLit { lit: Lit::Int(i), .. })) => {
            let v: u64 = i.base10_parse::<u64>()?.max(1);
            quote!(::core::option::Option::Some(::celeriac::retry::Backoff { factor: #v, maximum: #backoff_max, jitter: #jitter }))
        }
        Some(other) => {
            return Err(syn::Error::new(other.span(), "`retry_backoff` takes `true` or a whole-number factor"));
        }
    };
    let priority = match opts.get("priority") {
        None => quote!(::core::option::Option::None),
        Some(Expr::Lit(ExprLit { lit: Lit::Int(i), .. })) => match i.base10_parse::<u8>() {
            Ok(v) if v <= 9 => quote!(::core::option::Option::Some(#v)),
            _ => return Err(syn::Error::new(i.span(), format!("`priority` is a whole number from 0 to 9, not {i}"))),
        },
        Some(other) => {
            return Err(syn::Error::new_spanned(other, "`priority` is a whole number from 0 to 9, e.g. priority = 5"));
        }
    };
    let acks_late = opt_bool("acks_late")?;
    let ignore_result = opt_bool("ignore_result")?;
    let track_started = opt_bool("track_started")?;
    let time_limit = opt_f64("time_limit")?;
    let soft_time_limit = opt_f64("soft_time_limit")?;
    let rate_limit = opt_string("rate_limit")?;
    let queue = opt_string("queue")?;
    let blocking = opts.flag("blocking")?.unwrap_or(false);
    Ok(quote!(::celeriac::TaskOptions {
        retry: ::celeriac::retry::RetryPolicy {
            max_retries: #max_retries,
            default_retry_delay: #default_retry_delay,
            autoretry_for: ::std::vec![#(::std::string::String::from(#autoretry)),*],
            backoff: #backoff,
        },
        acks_late: #acks_late,
        ignore_result: #ignore_result,
        track_started: #track_started,
        time_limit: #time_limit,
        soft_time_limit: #soft_time_limit,
        rate_limit: #rate_limit,
        queue: #queue,
        priority: #priority,
        blocking: #blocking,
    }))
}

/// The hook methods. Each hook is first bound to a function pointer of the expected signature,
/// spanned at the option's value, so a function with the wrong signature is reported there with
/// both signatures side by side.
fn hook_tokens(opts: &Options) -> syn::Result<Tokens> {
    let value = quote!(&::celeriac::__private::serde_json::Value);
    let exc = quote!(&::celeriac::ExceptionInfo);
    let state = quote!(&::celeriac::State);
    let hooks = [
        ("on_success", vec![(quote!(result), value.clone())]),
        ("on_retry", vec![(quote!(exc), exc.clone())]),
        ("on_failure", vec![(quote!(exc), exc)]),
        ("after_return", vec![(quote!(state), state), (quote!(result), value)]),
    ];
    let mut out = Tokens::new();
    for (name, params) in hooks {
        let Some(path) = opts.get(name) else { continue };
        let method = format_ident!("{}", name);
        let names: Vec<_> = params.iter().map(|(n, _)| n).collect();
        let types: Vec<_> = params.iter().map(|(_, t)| t).collect();
        let bind = quote_spanned!(path.span()=> let hook: fn(&::celeriac::Request, #(#types),*) = #path;);
        let call = quote_spanned!(path.span()=> hook);
        out.extend(quote! {
            fn #method(&self, request: &::celeriac::Request, #(#names: #types),*) {
                #bind
                #call(request, #(#names),*)
            }
        });
    }
    Ok(out)
}
