//! Code contexts: named, long-lived kernels. Each context owns one kernel at a time; a kernel
//! that died is replaced on the next use (its state is gone, and the cell that saw it die
//! reported that). The first context per language is that language's default, used by
//! `/execute` calls that name a language but no context.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::kernel::{Kernel, KernelEnv, KernelError, kernel_for_language};

#[derive(Debug, Clone, Serialize)]
pub struct ContextInfo {
    pub id: String,
    pub language: String,
    pub cwd: String,
}

pub struct Context {
    pub info: ContextInfo,
    kernel: tokio::sync::Mutex<Option<Arc<Kernel>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error(
        "no context with id {0:?}; list them with GET /contexts or create one with POST /contexts"
    )]
    NotFound(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("working directory {0:?} does not exist in the sandbox; create it first or omit cwd")]
    BadCwd(String),
    #[error(
        "this sandbox already has {0} code contexts (each is a kernel process); remove one with DELETE /contexts/{{id}} first"
    )]
    TooMany(usize),
}

/// Contexts per sandbox: each is a kernel process of 50-150 MB.
pub const MAX_CONTEXTS: usize = 32;

pub struct Contexts {
    env: KernelEnv,
    default_cwd: PathBuf,
    /// A started, idle Python kernel handed to the next Python context: kernel start (with its
    /// imports) is seconds under software emulation, so it is paid ahead of time, and the spare
    /// made before the template snapshot is in every sandbox already.
    spare: tokio::sync::Mutex<Option<Arc<Kernel>>>,
    keep_spare: std::sync::atomic::AtomicBool,
    map: Mutex<HashMap<String, Arc<Context>>>,
    defaults: Mutex<HashMap<String, String>>,
    order: Mutex<Vec<String>>,
}

impl Contexts {
    pub fn new(env: KernelEnv, default_cwd: PathBuf) -> Contexts {
        Contexts {
            env,
            default_cwd,
            map: Mutex::default(),
            defaults: Mutex::default(),
            order: Mutex::default(),
            spare: tokio::sync::Mutex::new(None),
            keep_spare: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Keeps one spare Python kernel started from now on (see `spare`); returns once the first
    /// spare is ready, so a snapshot taken after it holds one.
    pub async fn keep_spare_python(self: &Arc<Self>) {
        self.keep_spare
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.refill_spare().await;
    }

    async fn refill_spare(&self) {
        let mut slot = self.spare.lock().await;
        if slot.as_ref().is_some_and(|k| k.is_alive()) {
            return;
        }
        match Kernel::start(&self.env, "python", &self.default_cwd, &[]).await {
            Ok(k) => *slot = Some(k),
            Err(e) => tracing::warn!(error = %e, "spare python kernel failed to start"),
        }
    }

    /// A fresh kernel for `lang` in `cwd`: the spare when there is one (moved to `cwd`), else a
    /// new process. Taking the spare starts the next one in the background.
    async fn fresh_kernel(
        self: &Arc<Self>,
        lang: &str,
        cwd: &Path,
    ) -> Result<Arc<Kernel>, ContextError> {
        if lang == "python" && self.keep_spare.load(std::sync::atomic::Ordering::SeqCst) {
            let taken = self.spare.lock().await.take().filter(|k| k.is_alive());
            let me = self.clone();
            tokio::spawn(async move { me.refill_spare().await });
            if let Some(k) = taken {
                if cwd != self.default_cwd {
                    let guard = k.lock().await;
                    let code = format!(
                        "__import__('os').chdir({})",
                        serde_json::to_string(&cwd.display().to_string()).expect("serialises")
                    );
                    let failed = k.run_silent(&code).await?;
                    drop(guard);
                    if let Some(err) = failed {
                        tracing::warn!(%err, "moving the spare kernel to its cwd failed");
                        return Ok(Kernel::start(&self.env, lang, cwd, &[]).await?);
                    }
                }
                return Ok(k);
            }
        }
        Ok(Kernel::start(&self.env, lang, cwd, &[]).await?)
    }

    pub fn kernel_env(&self) -> &KernelEnv {
        &self.env
    }

    fn canonical_language(&self, language: Option<&str>) -> Result<&'static str, ContextError> {
        let (spec, lang) = kernel_for_language(language);
        if spec.is_empty() || !self.env.available().contains(&lang) {
            return Err(ContextError::Kernel(
                self.env.unknown_language(language.unwrap_or("python")),
            ));
        }
        Ok(lang)
    }

    /// Creates a context and starts its kernel.
    pub async fn create(
        self: &Arc<Self>,
        language: Option<&str>,
        cwd: Option<&str>,
    ) -> Result<Arc<Context>, ContextError> {
        let lang = self.canonical_language(language)?;
        let cwd = match cwd {
            Some(c) if !c.is_empty() => PathBuf::from(c),
            _ => self.default_cwd.clone(),
        };
        if !cwd.is_dir() {
            return Err(ContextError::BadCwd(cwd.display().to_string()));
        }
        if self.map.lock().expect("contexts").len() >= MAX_CONTEXTS {
            return Err(ContextError::TooMany(MAX_CONTEXTS));
        }
        let kernel = self.fresh_kernel(lang, &cwd).await?;
        let ctx = Arc::new(Context {
            info: ContextInfo {
                id: uuid::Uuid::new_v4().to_string(),
                language: lang.to_string(),
                cwd: cwd.display().to_string(),
            },
            kernel: tokio::sync::Mutex::new(Some(kernel)),
        });
        self.map
            .lock()
            .expect("contexts")
            .insert(ctx.info.id.clone(), ctx.clone());
        self.order
            .lock()
            .expect("contexts")
            .push(ctx.info.id.clone());
        Ok(ctx)
    }

    /// The default context of `language`, created (and its kernel started) on first use.
    pub async fn default_for(
        self: &Arc<Self>,
        language: Option<&str>,
    ) -> Result<Arc<Context>, ContextError> {
        let lang = self.canonical_language(language)?;
        let existing = self.defaults.lock().expect("contexts").get(lang).cloned();
        if let Some(id) = existing
            && let Ok(ctx) = self.get(&id)
        {
            return Ok(ctx);
        }
        let ctx = self.create(Some(lang), None).await?;
        self.defaults
            .lock()
            .expect("contexts")
            .insert(lang.to_string(), ctx.info.id.clone());
        Ok(ctx)
    }

    pub fn get(&self, id: &str) -> Result<Arc<Context>, ContextError> {
        self.map
            .lock()
            .expect("contexts")
            .get(id)
            .cloned()
            .ok_or_else(|| ContextError::NotFound(id.to_string()))
    }

    pub fn list(&self) -> Vec<ContextInfo> {
        let map = self.map.lock().expect("contexts");
        self.order
            .lock()
            .expect("contexts")
            .iter()
            .filter_map(|id| map.get(id).map(|c| c.info.clone()))
            .collect()
    }

    /// Removes a context and kills its kernel.
    pub async fn remove(&self, id: &str) -> Result<(), ContextError> {
        let ctx = self
            .map
            .lock()
            .expect("contexts")
            .remove(id)
            .ok_or_else(|| ContextError::NotFound(id.to_string()))?;
        self.order.lock().expect("contexts").retain(|x| x != id);
        self.defaults
            .lock()
            .expect("contexts")
            .retain(|_, v| v != id);
        ctx.kernel.lock().await.take();
        Ok(())
    }

    /// Replaces the context's kernel with a fresh one: all state is cleared.
    pub async fn restart(&self, id: &str) -> Result<(), ContextError> {
        let ctx = self.get(id)?;
        let mut slot = ctx.kernel.lock().await;
        slot.take();
        *slot = Some(
            Kernel::start(&self.env, &ctx.info.language, Path::new(&ctx.info.cwd), &[]).await?,
        );
        Ok(())
    }

    /// The context's kernel, started again if the previous one died.
    pub async fn kernel(self: &Arc<Self>, ctx: &Context) -> Result<Arc<Kernel>, ContextError> {
        let mut slot = ctx.kernel.lock().await;
        if let Some(k) = slot.as_ref()
            && k.is_alive()
        {
            return Ok(k.clone());
        }
        if slot.is_some() {
            tracing::warn!(context = %ctx.info.id, "kernel died; starting a new one");
        }
        slot.take();
        let k = Kernel::start(&self.env, &ctx.info.language, Path::new(&ctx.info.cwd), &[]).await?;
        *slot = Some(k.clone());
        Ok(k)
    }
}
