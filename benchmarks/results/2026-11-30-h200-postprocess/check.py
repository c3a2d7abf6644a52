import torch,time,statistics,json
from PIL import Image
from diffusers.image_processor import VaeImageProcessor as V
p=V()
def dev(x,f):
    x=p._denormalize_conditionally(x,f)
    u=torch.nan_to_num((x.float()*255).round(),nan=0.0).to(torch.uint8).permute(0,2,3,1).contiguous().cpu().numpy()
    if u.shape[-1]==1: return [Image.fromarray(o.squeeze(),mode="L") for o in u]
    return [Image.fromarray(o) for o in u]
B=lambda ims:[(i.mode,i.size,i.tobytes()) for i in ims]
c=torch.device("cuda")
allh=torch.arange(-2**15,2**15,dtype=torch.int32).to(torch.int16).view(torch.float16).reshape(1,4,128,128)
near=torch.tensor([2*(k+.5)/255-1 for k in range(255)])
cand=(near.view(torch.int32)[:,None]+torch.arange(-64,65,dtype=torch.int32)).view(torch.float32).reshape(-1)
px=(cand*.5+.5).clamp(0,1)*255;ties=cand[px-px.floor()==.5];n=int(len(ties)**.5)
ties=ties[:n*n].reshape(1,1,n,n).expand(2,3,n,n).contiguous()
g=torch.Generator().manual_seed(0);far=torch.randn(3,3,64,64,generator=g)*4;far[0,0,:2]=float("nan")
cases={"allfp16":allh,"ties":ties,"ties16":ties.half(),"far32":far,"far16":far.half(),"bf16":far.bfloat16(),"gray":far[:,:1].half()}
for k,x in cases.items():
    for f in (None,[True]*x.shape[0]):
        print(k,f is None,len(ties),B(p.postprocess(x.to(c),"pil",f))==B(dev(x.to(c),f)))
def med(fn,x):
    t=[]
    for i in range(35):
        torch.cuda.synchronize();s=time.perf_counter();fn(x);t.append((time.perf_counter()-s)*1e3)
    return round(statistics.median(t[5:]),2)
for b in (1,4):
    x=(torch.randn(b,3,512,512,device=c)*.6).half();f=[True]*b
    print("RESULT",json.dumps(dict(batch=b,diffusers_ms=med(lambda y:p.postprocess(y,"pil",f),x),device_ms=med(lambda y:dev(y,f),x),same=B(p.postprocess(x,"pil",f))==B(dev(x,f)))))
