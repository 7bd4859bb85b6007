//! `#[task]`: turns an `async fn` into a Celeriac task type.
//!
//! The attribute expands to calls of `celeriac`'s public API only: a unit struct named after
//! the function implementing `celeriac::Task`, with `s(..)` / `si(..)` to build signatures,
//! `delay(&app, ..)` to send, and `call(..)` to run the body directly.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as Tokens};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, FnArg, ItemFn, Lit, Pat, ReturnType, Type};

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
/// `rate_limit` (`"10/s"`), `queue`, `priority`, `bind` (first parameter is the
/// `celeriac::Request`), and hooks `on_success`, `on_retry`, `on_failure`, `after_return`
/// (paths to plain functions).
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
            Some(other) => Err(syn::Error::new(other.span(), format!("`{key}` takes a string literal, e.g. {key} = \"...\""))),
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
        let key = meta.path.get_ident().map(|i| i.to_string()).unwrap_or_default();
        if !OPTIONS.contains(&key.as_str()) {
            return Err(meta.error(format!("unknown task option `{key}`; valid options are: {}", OPTIONS.join(", "))));
        }
        let value: Expr = if meta.input.peek(syn::Token![=]) {
            meta.value()?.parse()?
        } else {
            syn::parse_quote!(true)
        };
        options.values.push((key, value));
        Ok(())
    });
    syn::parse::Parser::parse2(parser, attr)?;
    Ok(options)
}

fn expand(attr: Tokens, func: ItemFn) -> syn::Result<Tokens> {
    let opts = parse_options(attr)?;
    let sig = &func.sig;
    if sig.asyncness.is_none() {
        return Err(syn::Error::new(sig.fn_token.span(), "#[task] needs an `async fn`: write `async fn` (tasks run on the worker's async runtime)"));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(sig.generics.span(), "#[task] functions cannot be generic: a task is registered under one name with one signature"));
    }
    let ret_ty = match &sig.output {
        ReturnType::Type(_, ty) if returns_result(ty) => ty.clone(),
        other => {
            return Err(syn::Error::new(
                other.span(),
                "#[task] functions return `celeriac::TaskResult<T>` (or another `Result<T, E>` whose error converts into `TaskError`)",
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
            return Err(syn::Error::new(pt.pat.span(), "task parameters must be plain names (`x: i64`): the name is the keyword argument"));
        };
        if bind && i == 0 {
            request_param = Some((pi.ident.clone(), (*pt.ty).clone()));
            continue;
        }
        if let Type::Reference(r) = &*pt.ty {
            return Err(syn::Error::new(r.span(), "task parameters must be owned values (e.g. `String`, not `&str`): arguments are decoded from the message"));
        }
        params.push((pi.ident.clone(), (*pt.ty).clone()));
    }
    if bind && request_param.is_none() {
        return Err(syn::Error::new(sig.inputs.span(), "`bind = true` needs a first parameter of type `celeriac::Request`"));
    }

    let name_expr = match opts.string("name")? {
        Some(n) => quote!(#n),
        None => {
            let fn_name = ident.to_string();
            quote!({
                static NAME: ::std::sync::OnceLock<::std::string::String> = ::std::sync::OnceLock::new();
                NAME.get_or_init(|| ::std::format!("{}.{}", ::core::module_path!().replace("::", "."), #fn_name)).as_str()
            })
        }
    };

    let options = options_tokens(&opts)?;
    let hooks = hook_tokens(&opts)?;

    let names: Vec<_> = params.iter().map(|(n, _)| n).collect();
    let name_strs: Vec<String> = params.iter().map(|(n, _)| n.to_string()).collect();
    let types: Vec<_> = params.iter().map(|(_, t)| t).collect();
    let indexes: Vec<usize> = (0..params.len()).collect();
    let count = params.len();
    let asserts = params.iter().map(|(_, ty)| {
        quote_spanned!(ty.span()=> const _: () = ::celeriac::__private::assert_task_value::<#ty>();)
    });

    let (req_decl, req_call, req_take) = match &request_param {
        Some((n, ty)) => (quote!(#n: #ty,), quote!(__request,), quote!()),
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
                ::celeriac::Signature::new(Self::name(), ::std::vec![#(::celeriac::__private::arg(#names)),*])
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

            fn run(&self, __request: ::celeriac::Request, mut __args: ::celeriac::Args) -> ::celeriac::__private::BoxFuture<'static, ::celeriac::TaskResult<::celeriac::__private::serde_json::Value>> {
                ::std::boxed::Box::pin(async move {
                    #req_take
                    #(let #names: #types = __args.take(#indexes, #name_strs).map_err(::celeriac::TaskError::Arguments)?;)*
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
        Some(other) => return Err(syn::Error::new(other.span(), "`max_retries` takes a whole number, or `None` to retry forever")),
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
                other => Err(syn::Error::new(other.span(), "`autoretry_for` lists error type names, e.g. [\"Timeout\", HttpError]")),
            })
            .collect::<syn::Result<Vec<_>>>()?,
        Some(other) => return Err(syn::Error::new(other.span(), "`autoretry_for` takes a list, e.g. autoretry_for = [\"Timeout\"]")),
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
        None | Some(Expr::Lit(ExprLit { lit: Lit::Bool(syn::LitBool { value: false, .. }), .. })) => quote!(::core::option::Option::None),
        Some(Expr::Lit(ExprLit { lit: Lit::Bool(_), .. })) => {
            quote!(::core::option::Option::Some(::celeriac::retry::Backoff { factor: 1, maximum: #backoff_max, jitter: #jitter }))
        }
        Some(Expr::Lit(ExprLit { lit: Lit::Int(i), .. })) => {
            let v: u64 = i.base10_parse::<u64>()?.max(1);
            quote!(::core::option::Option::Some(::celeriac::retry::Backoff { factor: #v, maximum: #backoff_max, jitter: #jitter }))
        }
        Some(other) => return Err(syn::Error::new(other.span(), "`retry_backoff` takes `true` or a whole-number factor")),
    };
    let priority = match opts.get("priority") {
        None => quote!(::core::option::Option::None),
        Some(Expr::Lit(ExprLit { lit: Lit::Int(i), .. })) => {
            let v: u8 = i.base10_parse()?;
            if v > 9 {
                return Err(syn::Error::new(i.span(), "`priority` is 0-9"));
            }
            quote!(::core::option::Option::Some(#v))
        }
        Some(other) => return Err(syn::Error::new(other.span(), "`priority` is a number 0-9")),
    };
    let acks_late = opt_bool("acks_late")?;
    let ignore_result = opt_bool("ignore_result")?;
    let track_started = opt_bool("track_started")?;
    let time_limit = opt_f64("time_limit")?;
    let soft_time_limit = opt_f64("soft_time_limit")?;
    let rate_limit = opt_string("rate_limit")?;
    let queue = opt_string("queue")?;
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
    }))
}

fn hook_tokens(opts: &Options) -> syn::Result<Tokens> {
    let mut out = Tokens::new();
    let hooks = [
        ("on_success", quote!(_result: &::celeriac::__private::serde_json::Value), quote!(_result)),
        ("on_retry", quote!(_exc: &::celeriac::ExceptionInfo), quote!(_exc)),
        ("on_failure", quote!(_exc: &::celeriac::ExceptionInfo), quote!(_exc)),
    ];
    for (name, param, arg) in hooks {
        if let Some(path) = opts.get(name) {
            let method = format_ident!("{}", name);
            out.extend(quote!(fn #method(&self, request: &::celeriac::Request, #param) { (#path)(request, #arg) }));
        }
    }
    if let Some(path) = opts.get("after_return") {
        out.extend(quote!(fn after_return(&self, request: &::celeriac::Request, state: &::celeriac::State, result: &::celeriac::__private::serde_json::Value) { (#path)(request, state, result) }));
    }
    let _ = Span::call_site();
    Ok(out)
}
